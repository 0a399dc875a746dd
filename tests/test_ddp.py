"""DDP: 2 CPU processes over gloo train an attached adapter exactly like one process would.

One spawn runs every case (process start-up dominates): LoRA with per-sample ±c rows, PiSSA,
a new round on top of a HistoryBake, then save (every rank calls, rank 0 writes) → load on every
rank → same outputs; accelerate's ``prepare(model, optimizer)`` takes the same step; an adapter
attached after DDP wrapped the model is refused; and the DDP benchmark's measurement runs once.
"""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import modlora as ml
from benchmarks import ddp_step
from modlora import distributed
from tests import distributed_cases as cases
from tests import tiny

BENCH_SPEC = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128}


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


def _extra(rank: int, world: int) -> dict:
    return {
        "refused": _refused_after_wrapping(),
        "accelerate": cases.accelerate_step(cases.rows(rank, world), rank, world),
        "shared": distributed.share_from_rank0(f"run folder of rank {rank}"),
        "mean": distributed.mean_over_ranks(float(rank)),
        "main": distributed.is_main_process(),
        "benchmark": ddp_step.measure(rank, BENCH_SPEC, (1, 8), repeats=1, r=4),
    }


@pytest.mark.slow
def test_ddp_trains_like_one_process_and_saves_the_same_file(tmp_path):
    results = cases.run_on_two_ranks(tmp_path, "ddp", _extra)  # accelerate checked there too
    for rank, got in enumerate(results):
        assert "were not in the model when DistributedDataParallel wrapped it" in got["refused"]
        assert got["shared"] == "run folder of rank 0" and got["mean"] == 0.5
        assert got["main"] == (rank == 0)
        # The benchmark's two steps (hooked LoRA, PEFT LoRA with the same factors) under DDP:
        # the same update up to fp32 summation order, and an update there was.
        check = got["benchmark"]["check"]
        assert check["factors_after_one_step_max_abs"] < 1e-6
        assert check["factors_moved_by_the_step_max_abs"] > 0
        assert {len(v["wall"]) for v in got["benchmark"]["samples"].values()} == {1}


def test_parallelize_refuses_a_model_without_an_attached_adapter():
    model = tiny.llama()
    ml.ModulatedLoRA(model, r=2)  # built, never attached: DDP would train nothing
    with pytest.raises(ValueError, match="attach the adapter to the model before wrapping"):
        distributed.parallelize(model, "ddp")
    with pytest.raises(ValueError, match="strategy must be one of"):
        distributed.parallelize(model, "zero3")


def test_setup_and_helpers_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.setup()  # nothing to start: one process
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert not torch.distributed.is_initialized()
    assert distributed.is_main_process()
    assert distributed.share_from_rank0({"dir": "x"}) == {"dir": "x"}
    assert distributed.mean_over_ranks(torch.tensor(2.5)) == 2.5
    distributed.barrier()  # no-op
