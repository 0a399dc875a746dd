"""Training steps run alike by one process on the full batch and by 2 ranks on half each.

Each case builds the tiny Llama, an adapter to train and its per-sample ±c rows, attaches, lets
``wrap`` wrap the model (identity, DDP or FSDP2) and takes one step; the multi-process tests
compare what every rank gets with the single-process reference on the full batch.
"""

import functools
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import modlora as ml
from modlora import distributed
from modlora.sharding import full_tensor
from tests import tiny

BATCH = 4
C_ROWS = torch.tensor([1.5, -1.5, 1.0, -0.5])  # per-sample ±c, split across the ranks
LR = 0.5


def rows(rank: int, world: int) -> slice:
    return slice(rank * BATCH // world, (rank + 1) * BATCH // world)


def _loss(model, x):
    return model(x).logits.float().pow(2).mean()


def lora(model):
    return tiny.signed_lora(model)


def pissa(model):
    return ml.ModulatedPiSSA(model, r=4, delta_s_init=0.05)


def round_on_history(model):
    """A new LoRA round trained on top of a HistoryBake of an earlier one."""
    ml.HistoryBake(model, [(tiny.signed_lora(model, seed=3), 1.0)])
    return tiny.signed_lora(model, seed=5)


CASES = {"lora": lora, "pissa": pissa, "history": round_on_history}


def gradients(build: Callable, part: slice, wrap: Callable) -> dict:
    """One backward of the ±c loss on the rows ``part``: ``{name: whole gradient}``."""
    model = tiny.llama()
    adapter = build(model)
    adapter.train()
    adapter.attach(model, c=C_ROWS[part])
    wrapped = wrap(model)
    _loss(wrapped, tiny.tokens(batch=BATCH)[part]).backward()
    return {n: full_tensor(p.grad) for n, p in adapter.named_parameters()}


def enable_checkpointing(model, reentrant: bool) -> None:
    """transformers' gradient checkpointing, under its new name (v5) or its old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def plus_minus_gradients(part: slice, wrap: Callable, checkpointing: bool) -> dict:
    """The README's ±c step — ``+c`` forward, ``set_coeff(-c)``, ``-c`` forward, one backward —
    optionally under transformers' (non-reentrant) gradient checkpointing."""
    model = tiny.llama().train()
    if checkpointing:
        enable_checkpointing(model, reentrant=False)
    adapter = lora(model)
    adapter.train()
    adapter.attach(model, c=C_ROWS[part])
    wrapped = wrap(model)
    x = tiny.tokens(batch=BATCH)[part]
    plus = _loss(wrapped, x)
    adapter.set_coeff(-C_ROWS[part])
    (plus - 0.5 * _loss(wrapped, x)).backward()
    return {n: full_tensor(p.grad) for n, p in adapter.named_parameters()}


def train_save_load(
    part: slice, wrap: Callable, folder: Path, tag: str, sharded: bool = False
) -> dict:
    """Save the LoRA before and after one SGD step (``save`` on every rank), then load the file
    into a fresh model: its outputs next to the trained adapter's."""
    model = tiny.llama()
    adapter = lora(model)
    adapter.train()
    adapter.attach(model, c=C_ROWS[part])
    wrapped = wrap(model)
    adapter.save(folder / f"{tag}_initial.safetensors", extra_meta={"step": 0})
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    x = tiny.tokens(batch=BATCH)[part]
    _loss(wrapped, x).backward()
    opt.step()
    path = adapter.save(folder / f"{tag}_trained.safetensors", extra_meta={"step": 1})
    if sharded:
        assert os.path.exists(path)  # a collective save returns once rank 0 has written
    distributed.barrier()  # unsharded, rank 0 writes on its own: wait for it before reading
    adapter.eval()
    with torch.no_grad():
        trained = wrapped(x).logits
        fresh = tiny.llama()
        loaded = ml.load_adapter(fresh, path)
        with loaded(fresh, c=C_ROWS[part]):
            reloaded = fresh(x).logits
    return {"trained": trained, "reloaded": reloaded}


def accelerate_step(part: slice, rank: int, world: int) -> dict:
    """accelerate's ``prepare(model, optimizer)`` (DDP on the running process group), one SGD
    step: ``{target: {role: tensor}}`` of the trained LoRA."""
    from accelerate import Accelerator

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )  # accelerate reads these; the process group is already running
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    model = tiny.llama()
    adapter = lora(model)
    adapter.train()
    adapter.attach(model, c=C_ROWS[part])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    prepared, opt = accelerator.prepare(model, opt)
    accelerator.backward(_loss(prepared, tiny.tokens(batch=BATCH)[part]))
    opt.step()
    return {
        n: {r: t.detach().clone() for r, t in ts.items()}
        for n, ts in adapter.target_tensors().items()
    }


def reference(tmp: Path) -> dict:
    """The single-process results on the full batch."""
    everything = slice(0, BATCH)
    out = {name: gradients(build, everything, lambda m: m) for name, build in CASES.items()}
    out["plus_minus"] = plus_minus_gradients(everything, lambda m: m, checkpointing=False)
    out["outputs"] = train_save_load(everything, lambda m: m, tmp, "single")
    return out


def _contents(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header, data bytes). The header is compared as a map: safetensors
    writes the metadata in the order of a Rust HashMap, random per process."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]  # header length
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def check_against(reference: dict, results: list[dict], tmp: Path, tag: str) -> None:
    """Every rank's gradients equal the reference; its saved files equal the single process's."""
    for rank, got in enumerate(results):
        for case in (*CASES, "plus_minus"):  # plus_minus: checkpointed on the ranks, not here
            want = reference[case]
            assert got[case].keys() == want.keys(), (rank, case)
            assert any(g.abs().sum() > 0 for g in want.values())
            for name, grad in got[case].items():
                # fp32 tolerance: the ranks' gradients are summed in another order
                torch.testing.assert_close(grad, want[name], msg=f"rank {rank} {case}: {name}")
        outputs = got["outputs"]
        torch.testing.assert_close(outputs["reloaded"], outputs["trained"])
        part = rows(rank, len(results))
        torch.testing.assert_close(outputs["trained"], reference["outputs"]["trained"][part])
    assert _contents(tmp / f"{tag}_initial.safetensors") == _contents(
        tmp / "single_initial.safetensors"
    )
    # The trained tensors agree to fp32 tolerance only (summation order), so the integrity
    # digest of their bytes differs; every other metadata key must be identical.
    a = ml.read_metadata(tmp / "single_trained.safetensors")
    b = ml.read_metadata(tmp / f"{tag}_trained.safetensors")
    assert "integrity" in a and "integrity" in b
    a.pop("integrity"), b.pop("integrity")
    assert a == b
    trained = ml.load_adapter(tiny.llama(), tmp / "single_trained.safetensors").target_tensors()
    _assert_same_tensors(
        ml.load_adapter(tiny.llama(), tmp / f"{tag}_trained.safetensors").target_tensors(), trained
    )
    for got in results:
        if "accelerate" in got:
            _assert_same_tensors(got["accelerate"], trained)


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        for role in want[name]:
            # fp32 tolerance: one SGD step on gradients summed across ranks in another order
            torch.testing.assert_close(got[name][role], want[name][role], msg=f"{name}.{role}")


def _rank(rank: int, world: int, tmp: str, strategy: str, extra: Callable) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        part = rows(rank, world)
        wrap = functools.partial(distributed.parallelize, strategy=strategy)
        out = {name: gradients(build, part, wrap) for name, build in CASES.items()}
        out["plus_minus"] = plus_minus_gradients(part, wrap, checkpointing=True)
        sharded = strategy == "fsdp2"
        out["outputs"] = train_save_load(part, wrap, Path(tmp), strategy, sharded=sharded)
        out.update(extra(rank, world))
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_two_ranks(tmp: Path, strategy: str, extra: Callable) -> list[dict]:
    """Every case on 2 gloo ranks wrapped by ``parallelize(model, strategy)``, checked against
    the single-process reference; ``extra(rank, world)`` adds that test's own results."""
    want = reference(tmp)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, str(tmp), strategy, extra), nprocs=2, join=True)
    results = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    check_against(want, results, tmp, strategy)
    return results
