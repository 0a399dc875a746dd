"""FSDP2 (``fully_shard``): 2 CPU processes over gloo train an attached adapter like one process.

One spawn runs every case: LoRA with per-sample ±c rows, PiSSA, a new round on top of a
HistoryBake; save (a collective: every rank calls, rank 0 writes the gathered tensors) → load on
every rank → same outputs; and what cannot work on shards is refused, naming FSDP2.
"""

import pytest
import torch

import modlora as ml
from modlora import distributed
from tests import distributed_cases as cases
from tests import tiny


def _shard(model):
    return distributed.parallelize(model, "fsdp2")  # fully_shard per block, then the root


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "not refused"


def _on_shards() -> dict:
    """What works and what is refused once the model is sharded."""
    model = tiny.llama()
    pissa = cases.pissa(model)
    before = pissa.delta_factors(1.0)
    pissa.attach(model, c=1.0)
    _shard(model)
    after = pissa.delta_factors(1.0)  # gathers delta_s: every rank calls
    pissa.detach()
    same = all(torch.equal(before[n][i], after[n][i]) for n in before for i in (0, 1))
    late = ml.ModulatedLoRA(model, r=2)
    return {
        "delta_factors_equal": same,
        "merge": _error(lambda: ml.merge(model, pissa, c=1.0)),
        "pissa_after_shard": _error(lambda: ml.ModulatedPiSSA(model, r=2)),
        "lora_after_shard": _error(lambda: late.attach(model, c=1.0)),
        "reattach": _error(lambda: pissa.attach(model, c=1.0).detach()),
    }


def _extra(rank: int, world: int) -> dict:
    return {"on_shards": _on_shards()}


@pytest.mark.slow
def test_fsdp2_trains_like_one_process_and_saves_the_same_file(tmp_path):
    results = cases.run_on_two_ranks(tmp_path, "fsdp2", _extra)
    for got in results:
        shards = got["on_shards"]
        assert shards["delta_factors_equal"]
        assert shards["reattach"] == "not refused"  # its parameters were sharded with the model
        assert shards["merge"].startswith("MergeError") and "sharded by FSDP2" in shards["merge"]
        assert "sharded by FSDP2" in shards["pissa_after_shard"]
        assert "build it before fully_shard" in shards["pissa_after_shard"]
        assert "Attach the adapter before calling fully_shard" in shards["lora_after_shard"]
