"""Gradient checkpointing: the recomputed forward sees each adapter as its original forward did.

The README's ±c pattern — ``+c`` forward, ``set_coeff(-c)``, ``-c`` forward, one backward — must
give the gradients of the same steps without checkpointing, in both flavours of
``torch.utils.checkpoint`` (reentrant and not), through transformers' switch and through
``torch.utils.checkpoint`` called directly; leaving the with-block before the backward raises.
"""

import pytest
import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from torch.utils.checkpoint import CheckpointError, checkpoint

import modlora as ml
from modlora import recompute
from tests import tiny
from tests.distributed_cases import enable_checkpointing

PLUS = 1.5
MINUS = -1.5
PER_SAMPLE_PLUS = torch.tensor([1.5, -0.5])
PER_SAMPLE_MINUS = torch.tensor([-1.5, 2.0])


def _grads(adapter) -> dict:
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.zero_grad(set_to_none=True)
    return grads


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert any(g.abs().sum() > 0 for g in want.values())


def _plus_minus_step(model, adapter, x, plus, minus) -> None:
    """The README pattern: +c forward, set_coeff(-c), -c forward, one backward."""
    with adapter(model, c=plus):
        loss_plus = model(x).logits.float().pow(2).mean()
        adapter.set_coeff(minus)
        loss_minus = model(x).logits.float().pow(2).mean()
        (loss_plus - 0.5 * loss_minus).backward()


def _assert_checkpointing_keeps_the_gradients(model, lora, plus, minus, reentrant):
    """The ± step's gradients with HF gradient checkpointing turned on equal those without."""
    x = tiny.tokens()
    lora.train()
    _plus_minus_step(model, lora, x, plus, minus)
    want = _grads(lora)
    enable_checkpointing(model, reentrant)
    _plus_minus_step(model, lora, x, plus, minus)
    _assert_same(_grads(lora), want)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar_c", "per_sample_c"])
def test_plus_minus_pattern_under_hf_checkpointing_gives_the_plain_gradients(reentrant, per_sample):
    plus, minus = (PER_SAMPLE_PLUS, PER_SAMPLE_MINUS) if per_sample else (PLUS, MINUS)
    model = tiny.llama().train()
    lora = tiny.signed_lora(model)
    _assert_checkpointing_keeps_the_gradients(model, lora, plus, minus, reentrant)
    assert not any(lora in log.records for log in recompute._LOGS.values())  # freed with the graph


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_plus_minus_pattern_on_fused_moe_experts(reentrant):
    """Mixtral's fused 3-D expert weights are adapted by the experts hooks (before and after the
    experts module's forward): their recomputation replays the original c too."""
    model = tiny.mixtral().train()
    lora = tiny.signed_lora(model, targets=("experts",))
    _assert_checkpointing_keeps_the_gradients(model, lora, PLUS, MINUS, reentrant)


class _Stack(nn.Module):
    """Four linear layers, each called through ``torch.utils.checkpoint`` when ``flavour`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.flavour: bool | None = None  # None: no checkpointing; else use_reentrant

    def forward(self, x):
        for layer in self.layers:
            if self.flavour is None:
                x = torch.tanh(layer(x))
            else:
                x = checkpoint(lambda h, m=layer: torch.tanh(m(h)), x, use_reentrant=self.flavour)
        return x


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_plain_torch_checkpoint_with_history_switches_and_dropout(reentrant):
    """A new round on top of a HistoryBake, the history switched off for the second forward, and
    adapter dropout (the checkpoint replays its random mask): the same gradients as without."""
    torch.manual_seed(0)
    model = _Stack()
    x = torch.randn(3, 8, requires_grad=True)
    first = ml.ModulatedLoRA(model, r=2, init="signed", targets=("layers",))
    with torch.no_grad():
        first.part("layers.0").lora_B.normal_(0, 0.3)
    hist = ml.HistoryBake(model, [(first, 1.0)])
    lora = ml.ModulatedLoRA(model, r=2, init="signed", dropout=0.2, targets=("layers",))
    lora.train()

    def step():
        torch.manual_seed(1)
        with lora(model, c=torch.tensor([1.5, -0.5, 1.0])):
            a = model(x).pow(2).sum()
            lora.set_coeff(-0.5)
            hist.enabled = False
            b = model(x).pow(2).sum()
            hist.enabled = True
            (a + b).backward()
        grads = _grads(lora)
        grads["x"], x.grad = x.grad.clone(), None
        return grads

    want = step()
    model.flavour = reentrant
    _assert_same(step(), want)
    hist.remove()


def _loss_from_a_block_already_left(reentrant: bool):
    """``(loss, warnings)``: a checkpointed forward inside a with-block whose backward was not
    run before the block was left."""
    model = tiny.llama().train()
    lora = tiny.signed_lora(model)
    lora.train()
    enable_checkpointing(model, reentrant=reentrant)
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        with lora(model, c=PLUS):
            loss = model(tiny.tokens()).logits.pow(2).mean()
    finally:
        logger.remove(sink)
    return loss, messages


def test_backward_after_leaving_the_block_raises_for_reentrant_checkpointing():
    loss, messages = _loss_from_a_block_already_left(reentrant=True)
    assert any("run backward inside the with-block" in m for m in messages)
    with pytest.raises(ml.AdapterStateError, match="detached .* before its backward"):
        loss.backward()


def test_backward_after_leaving_the_block_raises_for_non_reentrant_checkpointing():
    loss, _ = _loss_from_a_block_already_left(reentrant=False)
    with pytest.raises(CheckpointError, match="different number of tensors"):
        loss.backward()  # torch's own check: the recomputation saved fewer tensors


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_leaving_and_reentering_before_the_backward_replays_the_first_block(reentrant):
    x = tiny.tokens()
    model = tiny.llama().train()
    lora = tiny.signed_lora(model)
    lora.train()
    with lora(model, c=PLUS):
        model(x).logits.pow(2).mean().backward()
    want = _grads(lora)

    enable_checkpointing(model, reentrant)
    with lora(model, c=PLUS):
        loss = model(x).logits.pow(2).mean()
    with lora(model, c=MINUS):  # back in a block (another c) before the backward
        loss.backward()
    _assert_same(_grads(lora), want)


def test_an_adapter_attached_after_the_forward_adds_nothing_to_its_recomputation():
    torch.manual_seed(0)
    model = _Stack()
    model.flavour = False
    x = torch.randn(3, 8, requires_grad=True)
    late = ml.ModulatedLoRA(model, r=2, init="signed", targets=("layers",))
    model(x).pow(2).sum().backward()
    want = x.grad.clone()
    x.grad = None
    loss = model(x).pow(2).sum()
    with late(model, c=2.0):
        loss.backward()
    assert torch.equal(x.grad, want)
    assert all(p.grad is None for p in late.parameters())


def test_a_recomputation_that_runs_the_adapter_more_often_raises():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin)
    lora = ml.ModulatedLoRA(model, r=2, init="signed", targets=("0",))
    calls = {"n": 0}

    def segment(h):
        calls["n"] += 1
        out = lin(h)
        return lin(out) if calls["n"] > 1 else out  # the recomputation takes another path

    x = torch.randn(2, 4, requires_grad=True)
    with lora(model, c=1.0):
        y = checkpoint(segment, x, use_reentrant=True)
        with pytest.raises(recompute.RecomputeError, match="more often"):
            F.mse_loss(y, torch.zeros_like(y)).backward()


def test_a_torch_whose_function_forward_keeps_forward_ad_on_raises_instead_of_guessing(
    monkeypatch,
):
    """Reentrant forwards are told from no_grad ones by forward-mode AD being off inside an
    autograd Function; were a torch to keep it on, no record is made, and the recomputation
    raises rather than drop the adapter."""
    monkeypatch.setattr(recompute, "_RECOGNISED", [False])
    torch.manual_seed(0)
    model = _Stack()
    model.flavour = True
    x = torch.randn(3, 8, requires_grad=True)
    lora = ml.ModulatedLoRA(model, r=2, init="signed", targets=("layers",))
    loss = model(x).pow(2).sum()  # forward before the attach: nothing recorded
    with lora(model, c=1.0), pytest.raises(recompute.RecomputeError, match="use_reentrant=False"):
        loss.backward()
