"""DDP: 2 CPU processes over gloo train an attached adapter exactly like one process would.

One spawn runs every case (process start-up dominates): LoRA with per-sample ±c rows, PiSSA,
a new round on top of a HistoryBake, then save (every rank calls, rank 0 writes) → load on every
rank → same outputs; accelerate's ``prepare(model, optimizer)`` takes the same step; and an
adapter attached after DDP wrapped the model is refused.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import modlora as ml
from modlora import distributed
from tests import distributed_cases as cases
from tests import tiny


def _refused_after_wrapping() -> str:
    model = tiny.llama()
    first, late = cases.lora(model), ml.ModulatedLoRA(model, r=2)
    first.attach(model, c=1.0)
    ddp = DistributedDataParallel(model)
    try:
        with late(ddp, c=1.0):
            pass
    except ml.AdapterStateError as err:
        return str(err)
    return "not refused"


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        part = cases.rows(rank, world)
        wrap = distributed.parallelize  # DistributedDataParallel(model), adapters checked
        out = {name: cases.gradients(build, part, wrap) for name, build in cases.CASES.items()}
        out["outputs"] = cases.train_save_load(part, wrap, Path(tmp), "ddp")
        out["refused"] = _refused_after_wrapping()
        out["accelerate"] = cases.accelerate_step(part, rank, world)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_trains_like_one_process_and_saves_the_same_file(tmp_path):
    reference = cases.reference(tmp_path)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    cases.check_against(reference, results, tmp_path, "ddp")
    for got in results:
        assert "were not in the model when DistributedDataParallel wrapped it" in got["refused"]


def test_parallelize_refuses_a_model_without_an_attached_adapter():
    model = tiny.llama()
    ml.ModulatedLoRA(model, r=2)  # built, never attached: DDP would train nothing
    with pytest.raises(ValueError, match="attach the adapter to the model before wrapping"):
        distributed.parallelize(model, "ddp")
    with pytest.raises(ValueError, match="strategy must be one of"):
        distributed.parallelize(model, "zero3")
