"""Case 8: one DDP training step on 2 CPU processes (gloo): hooked LoRA vs PEFT LoRA, same rank.

Each rank builds the same Llama-shaped model, a modlora LoRA (attached, then wrapped by
``DistributedDataParallel``) and PEFT's LoRA on a copy holding the same factors (wrapped too),
and times a full step on its half of the batch: ``zero_grad``, forward, loss, backward (with
DDP's gradient all-reduce), ``SGD.step``. The two steps alternate round by round (start rotated,
every step preceded by a barrier outside the timed region, so both ranks start it together);
rank 0's times are reported. Wall time is the primary clock here: a step's all-reduce waits
for the other rank, which process CPU time would not count. A correctness check first: one
step from the same factors gives the same updated factors in both.
"""

import os
import tempfile
from pathlib import Path

import torch

from .common import (
    Case,
    clone,
    interleave,
    llama_shaped,
    max_abs_diff,
    min_ratio,
    paired_iqr,
    paired_ratio,
    peft_twin,
    signed_lora,
    summarize,
    token_inputs,
)

WORLD = 2
LR = 1e-3


def _step(model, opt, inputs):
    def run():
        opt.zero_grad(set_to_none=True)
        model(**inputs).logits.float().pow(2).mean().backward()
        opt.step()

    return run


def _factor_diff(lora, peft_model) -> float:
    modules = dict(peft_model.module.base_model.model.named_modules())
    worst = 0.0
    for name, part in lora.named_parts():
        layer = modules[name]
        for mine, theirs in ((part.lora_A, layer.lora_A), (part.lora_B, layer.lora_B)):
            worst = max(worst, max_abs_diff(mine.detach(), theirs["default"].weight.detach()))
    return worst


def measure(rank: int, spec: dict, shape: tuple, repeats: int, r: int = 16) -> dict:
    """Rank ``rank``'s part of the case, in a running process group: ``{"samples", "check"}``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    world = dist.get_world_size()
    base = llama_shaped(**spec)
    lora = signed_lora(base, r=r)
    twin = peft_twin(clone(base), lora).train()
    lora.train().attach(base, c=1.0)
    hooked = DistributedDataParallel(base)
    peft_ddp = DistributedDataParallel(twin)
    batch, seq = shape
    inputs = token_inputs(spec["vocab"], batch * world, seq)
    inputs = {k: v[rank * batch : (rank + 1) * batch] for k, v in inputs.items()}
    opts = {
        name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
        for name, m in (("hooked", hooked), ("peft", peft_ddp))
    }
    steps = {
        "hooked": _step(hooked, opts["hooked"], inputs),
        "peft": _step(peft_ddp, opts["peft"], inputs),
    }
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    steps["hooked"]()
    steps["peft"]()
    moved = max(max_abs_diff(p.detach(), before[n]) for n, p in lora.named_parameters())
    check = {
        "factors_after_one_step_max_abs": _factor_diff(lora, peft_ddp),
        "factors_moved_by_the_step_max_abs": moved,  # the step did change them
    }
    cases = {name: Case(run, setup=dist.barrier) for name, run in steps.items()}
    return {"samples": interleave(cases, repeats, warmup=1), "check": check}


def _worker(rank: int, tmp: str, spec: dict, shape: tuple, repeats: int, r: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=WORLD)
    try:
        out = measure(rank, spec, shape, repeats, r)
        if rank == 0:
            torch.save(out, Path(tmp) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def ddp_case(spec: dict, shape: tuple[int, int], repeats: int, r: int = 16) -> dict:
    """Spawn the 2 ranks and summarise rank 0's step times (``shape``: per-rank batch, seq)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tmp, spec, shape, repeats, r), nprocs=WORLD, join=True)
        out = torch.load(Path(tmp) / "rank0.pt")
    return summarise(out, spec, shape, r)


def summarise(out: dict, spec: dict, shape: tuple[int, int], r: int) -> dict:
    """The case's result from rank 0's :func:`measure` output."""
    samples = out["samples"]
    result = {
        "world_size": WORLD,
        "backend": "gloo",
        "threads_per_rank": 1,
        "r": r,
        "per_rank_input_shape": list(shape),
        "model": spec,
        "check": out["check"],
        "clocks": {},
    }
    for clock in ("wall", "cpu"):
        result["clocks"][clock] = {
            "cases": summarize(samples, "peft", clock),
            "hooked_vs_peft": paired_ratio(samples, "hooked", "peft", clock),
            "hooked_vs_peft_min": min_ratio(samples, "hooked", "peft", clock),
            "hooked_vs_peft_iqr": paired_iqr(samples, "hooked", "peft", clock),
        }
    return result
