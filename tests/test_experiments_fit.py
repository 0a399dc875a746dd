"""The training loop's early stopping: the adapter ends with the weights of its best epoch."""

from types import SimpleNamespace

import torch
from torch import nn

import modlora as ml
from experiments.trainer import fit, make_optimizer, make_scheduler


class _GrowingB:
    """Training pushes the output up (lora_B grows every step); the validation loss is the
    squared size of lora_B minus a small reward, so it is lowest after the first epoch."""

    pcgrad_terms = ()

    def __init__(self, model: nn.Module, adapter) -> None:
        self.model, self.adapter = model, adapter
        self.x = torch.ones(4, 8)

    def batches(self, split, batch_size, generator):
        yield from torch.arange(4).split(batch_size)

    def n_batches(self, split, batch_size):
        return 4 // batch_size

    def terms(self, idx, split="train"):
        with self.adapter(self.model, c=1.0):
            out = self.model(self.x[idx])
        if split == "train":
            return {"push": -out.mean()}
        b = self.adapter.parts["0"].lora_B
        return {"size": (b.pow(2).sum() - 1e-6).detach()}


def test_early_stopping_restores_the_best_epoch_not_the_last():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    adapter = ml.ModulatedLoRA(model, r=2, targets=["0"])
    objective = _GrowingB(model, adapter)
    cfg = SimpleNamespace(
        batch_size=2, epochs=5, max_steps=100, grad_clip=1.0, patience=2, min_delta=0.0,
        log_every=0, progress=False,
    )  # fmt: skip
    optimizer = make_optimizer(list(adapter.parameters()), 0.05, 0.0)
    scheduler = make_scheduler(optimizer, 0, 10, 1.0)
    snapshots = []

    def remember(state, best):
        snapshots.append({k: v.clone() for k, v in adapter.state_dict().items()})

    state, best = fit(adapter, objective, optimizer, scheduler, cfg, 0, on_epoch_end=remember)
    vals = [h["val_loss"] for h in state.history]
    assert vals[0] < min(vals[1:]) and state.stopped_early  # epoch 1 is the best, training went on
    assert len(snapshots) == 3
    for key, want in snapshots[0].items():
        assert torch.equal(adapter.state_dict()[key], want), key
        assert torch.equal(best[key], want), key
    moved = "parts.0.lora_B"
    assert not torch.equal(snapshots[-1][moved], snapshots[0][moved])  # the last epoch differs
