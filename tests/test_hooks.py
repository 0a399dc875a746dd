"""Lifetime, coefficient and gradient rules of the one hook machinery (modlora/hooks.py)."""

import pytest
import torch

import modlora as ml
from tests import tiny
from tests.helpers import logits


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_when_the_block_raises(llama):
    lora = tiny.signed_lora(llama)
    with pytest.raises(RuntimeError, match="boom"), lora(llama, c=1.0):
        assert _hook_count(llama) == len(lora.layout)
        raise RuntimeError("boom")
    assert _hook_count(llama) == 0 and not lora.attached


def test_reentry_raises_and_keeps_the_first_attachment(llama):
    lora = tiny.signed_lora(llama)
    with lora(llama, c=1.0):
        with pytest.raises(ml.AdapterStateError, match="already attached"), lora(llama, c=2.0):
            pass
        with pytest.raises(ml.AdapterStateError, match="already attached"):
            lora.attach(llama, c=2.0)
        assert _hook_count(llama) == len(lora.layout) and lora.c == 1.0
    assert _hook_count(llama) == 0


def test_wrong_model_raises_without_touching_either(llama):
    lora = tiny.signed_lora(llama)
    other = tiny.llama()
    with pytest.raises(ValueError, match="was built on LlamaForCausalLM"):
        lora(other, c=1.0)
    with pytest.raises(ValueError, match="not on the"):
        lora.attach(other)
    assert _hook_count(llama) == 0 and _hook_count(other) == 0


def test_detach_when_detached_raises(llama):
    with pytest.raises(ml.AdapterStateError, match="not attached"):
        tiny.signed_lora(llama).detach()


@pytest.mark.parametrize(
    ("c", "error", "match"),
    [
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        (torch.tensor([1.0, float("nan")]), ValueError, "finite"),
        (torch.ones(2, 2), ValueError, r"shape \(batch,\)"),
        (torch.ones(0), ValueError, r"shape \(batch,\)"),
        ("1.0", TypeError, "coefficient c must be"),
        (True, TypeError, "bool"),
    ],
)
def test_bad_coefficient_raises_before_attaching(llama, c, error, match):
    # In the tests beartype checks annotations first: a wrong type or rank fails there, naming c.
    error, match = (error, TypeError), f"{match}|parameter 'c'"
    lora = tiny.signed_lora(llama)
    with pytest.raises(error, match=match):
        lora(llama, c=c)
    with pytest.raises(error, match=match):
        lora.attach(llama, c=c)
    assert _hook_count(llama) == 0
    lora.attach(llama, c=0.5)
    with pytest.raises(error, match=match):
        lora.set_coeff(c)
    assert lora.c == 0.5
    lora.detach()


def test_per_sample_c_with_wrong_batch_raises(llama):
    lora = tiny.signed_lora(llama)
    with (
        lora(llama, c=torch.tensor([1.0, -1.0, 0.5])),
        pytest.raises(ValueError, match="per-sample coefficient has 3 values"),
    ):
        llama(tiny.tokens(batch=2))
    assert _hook_count(llama) == 0


def test_persistent_form_and_set_coeff(llama):
    x = tiny.tokens()
    base = logits(llama, x)
    lora = tiny.signed_lora(llama)
    with lora(llama, c=-0.7):
        expected = logits(llama, x)
    lora.attach(llama, c=0.0)
    assert torch.equal(logits(llama, x), base)
    lora.set_coeff(-0.7)
    assert torch.equal(logits(llama, x), expected)
    lora.set_coeff(torch.tensor([-0.7, -0.7]))
    torch.testing.assert_close(logits(llama, x), expected)
    lora.set_coeff(0)
    assert torch.equal(logits(llama, x), base)
    lora.detach()


def test_coefficient_tensor_is_updated_in_place():
    from modlora.coefficient import Coefficient

    coeff = Coefficient(1.0)
    t = coeff.on(torch.device("cpu"))
    coeff.set(-2.0)
    assert coeff.on(torch.device("cpu")) is t and t.item() == -2.0 and not coeff.is_zero
    coeff.set(0.0)
    assert coeff.is_zero and t.item() == 0.0
    coeff.set(torch.tensor([1.0, 2.0]))
    per = coeff.on(torch.device("cpu"))
    coeff.set(torch.tensor([3.0, 4.0]))
    assert coeff.on(torch.device("cpu")) is per and per.tolist() == [3.0, 4.0]


def _grads(lora):
    return {k: p.grad.clone() for k, p in lora.named_parameters()}


def _zero(lora):
    for p in lora.parameters():
        p.grad = None


@pytest.mark.parametrize("per_sample", [False, True])
def test_plus_minus_c_then_one_backward_equals_two_backwards(llama, per_sample):
    """The field's training pattern: forward at +c, forward at -c, ONE backward."""
    x = tiny.tokens(batch=2)
    lora = tiny.signed_lora(llama)
    lora.train()
    plus = torch.tensor([1.5, 1.5]) if per_sample else 1.5
    minus = torch.tensor([-1.5, 1.0]) if per_sample else -1.5

    def loss_at(c, sign):
        lora.set_coeff(c)
        return sign * llama(x).logits.float().pow(2).mean()

    lora.attach(llama, c=plus)
    (loss_at(plus, 1.0) + loss_at(minus, -0.5)).backward()
    together = _grads(lora)
    _zero(lora)
    loss_at(plus, 1.0).backward()
    loss_at(minus, -0.5).backward()
    separate = _grads(lora)
    lora.detach()
    assert together.keys() == separate.keys()
    for k in together:
        torch.testing.assert_close(together[k], separate[k])
    assert any(g.abs().sum() > 0 for g in together.values())


def test_gradient_checkpointing_misuse_is_reported(llama):
    from loguru import logger

    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        enable = (
            getattr(llama, "activation_checkpointing_enable", None)
            or llama.gradient_checkpointing_enable
        )
        enable()
        llama.train()
        lora = tiny.signed_lora(llama)
        with lora(llama, c=1.0):
            loss = llama(tiny.tokens()).logits.pow(2).mean()
        assert any("run backward inside the with-block" in m for m in messages)
        del loss
        messages.clear()
        with lora(llama, c=1.0):
            llama(tiny.tokens()).logits.pow(2).mean().backward()  # the right way
        assert all(p.grad is not None for p in lora.parameters())
    finally:
        logger.remove(sink)


def test_enabled_switch_and_gate(llama):
    x = tiny.tokens()
    base = logits(llama, x)
    lora = tiny.signed_lora(llama)
    with lora(llama, c=1.0):
        on = logits(llama, x)
        lora.enabled = False
        assert torch.equal(logits(llama, x), base)
        lora.enabled = True
        lora.gate = lambda: False
        assert torch.equal(logits(llama, x), base)
        lora.gate = lambda: True
        assert torch.equal(logits(llama, x), on)


def test_bf16_model_keeps_output_dtype():
    model = tiny.llama().to(torch.bfloat16)
    lora = tiny.signed_lora(model)
    with lora(model, c=1.0):
        out = model(tiny.tokens()).logits
    assert out.dtype == torch.bfloat16
    assert next(lora.parameters()).dtype == torch.float32


def test_compiled_model_does_not_recompile_when_c_changes():
    import torch._dynamo
    from torch import nn

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lora = ml.ModulatedLoRA(model, r=2, init="signed")
    compilations = []

    def backend(gm, example_inputs):
        compilations.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    x = torch.randn(3, 8)
    lora.attach(model, c=1.0)
    try:
        for c in (1.0, -0.5, 2.0, 3.0):
            lora.set_coeff(c)
            with torch.no_grad():
                got = compiled(x)
                lora.enabled = False
                base = model(x)
                lora.enabled = True
                eager = model(x)
            torch.testing.assert_close(got, eager)
            assert not torch.equal(got, base)
    finally:
        lora.detach()
        torch._dynamo.reset()
    assert len(compilations) == 1


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_adapter_with_per_sample_c(grad):
    """A bf16 adapter on a bf16 model with one c per row (a crash seen in an earlier version)."""
    model = tiny.llama().to(torch.bfloat16)
    lora = tiny.signed_lora(model, dtype=torch.bfloat16)
    x = tiny.tokens(batch=2)
    with torch.set_grad_enabled(grad), lora(model, c=torch.tensor([1.0, -1.0])):
        both = model(x).logits
    with torch.no_grad(), lora(model, c=-1.0):
        second = model(x[1:]).logits
    assert both.dtype == torch.bfloat16
    # bf16: the batched and single-row kernels round differently (8 bits of mantissa).
    torch.testing.assert_close(both[1:].float().detach(), second.float(), atol=5e-2, rtol=5e-2)
