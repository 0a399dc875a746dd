"""DDP sees an attached adapter: 2 CPU processes over gloo train it like one process would."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests import tiny

BATCH = 4
COEFFS = torch.tensor([1.5, -1.5, 1.0, -0.5])  # per-sample ±c rows, split across the ranks


def _setup():
    model = tiny.llama()
    lora = tiny.signed_lora(model)
    lora.train()
    return model, lora


def _loss(model, x):
    return model(x).logits.float().pow(2).mean()


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, lora = _setup()
        local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        lora.attach(model, c=COEFFS[local])
        ddp = DistributedDataParallel(model)  # raised "no parameter that requires a gradient"
        _loss(ddp, tiny.tokens(batch=BATCH)[local]).backward()
        grads = {n: p.grad.clone() for n, p in lora.named_parameters()}
        torch.save(grads, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_the_single_process_full_batch(tmp_path):
    model, lora = _setup()
    with lora(model, c=COEFFS):
        _loss(model, tiny.tokens(batch=BATCH)).backward()
    reference = {n: p.grad for n, p in lora.named_parameters()}
    assert any(g.abs().sum() > 0 for g in reference.values())

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], msg=f"rank {rank}: {name}")
