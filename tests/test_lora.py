import pytest
import torch
import torch.nn.functional as F

import modlora as ml
from tests import tiny
from tests.helpers import assert_each_row_alone, hand_merged, logits, same_weights, weights


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("c", [-2.5, 1.0, 7.0])
def test_zero_init_is_bit_identical_at_any_c(arch, c):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = logits(model, x)
    lora = ml.ModulatedLoRA(model, r=4)
    with lora(model, c=c):
        assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_c_zero_is_bit_identical_and_hooks_go_away(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = logits(model, x)
    lora = tiny.signed_lora(model)
    with lora(model, c=0.0):
        assert torch.equal(logits(model, x), base)
    with lora(model, c=1.0):
        assert not torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), base)
    assert all(not t.module._forward_hooks for t in lora.layout)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma", "gpt_neox", "bert"])
def test_hooked_forward_equals_hand_edited_weights(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    lora = tiny.signed_lora(model, layer_range=(0.25, 1.0))
    hooked = logits(model, x, lora, c=-1.5)
    # Reference: W += c · alpha/r · lora_B @ lora_A written into a copy's weights by hand.
    torch.testing.assert_close(logits(hand_merged(model, [(lora, -1.5)]), x), hooked)


def _layer_reference(layer, h, a, b, c, scale):
    """``x @ W.T + bias + c · scale · (x @ A.T) @ B.T``, from the raw tensors with plain torch."""
    return F.linear(h, layer.weight, layer.bias) + c * scale * (h @ a.T) @ b.T


@pytest.mark.parametrize("c", [1.0, 2.0, -3.0, 0.37])
def test_layer_output_is_the_lora_formula(llama, c):
    name = "model.layers.3.mlp.down_proj"
    lora = tiny.signed_lora(llama)  # r=4, alpha=8
    layer = lora.layout[name].module
    a, b = lora.part(name).lora_A, lora.part(name).lora_B
    h = torch.randn(5, layer.in_features)
    with torch.no_grad():
        base = layer(h)
        with lora(llama, c=c):
            got = layer(h)
        expected = _layer_reference(layer, h, a, b, c, 8 / 4)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base)  # the delta is large enough to be seen


def test_delta_factors_are_the_raw_tensors_scaled(llama):
    """``delta_factors(c)`` is ``(lora_A, c · alpha/r · lora_B)``: one exact multiplication."""
    lora = tiny.signed_lora(llama, r=4, alpha=2)  # alpha/r = 1/2 and c = -1.5: c · alpha/r is exact
    factors = lora.delta_factors(-1.5)
    assert list(factors) == lora.layout.names
    for name, (a, b) in factors.items():
        part = lora.part(name)
        assert torch.equal(a, part.lora_A) and torch.equal(b, -0.75 * part.lora_B)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_sample_c_equals_each_row_alone(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens(batch=3)
    lora = tiny.signed_lora(model)
    cs = torch.tensor([1.0, -2.0, 0.0])
    assert_each_row_alone(model, lora, x, cs)


def test_base_frozen_adapter_trainable_and_on_layer_device(llama):
    lora = ml.ModulatedLoRA(llama, r=4, alpha=16)
    assert not any(p.requires_grad for p in llama.parameters())
    params = dict(lora.named_parameters())
    assert len(params) == 2 * len(lora.layout)
    name = "model.layers.0.self_attn.q_proj"
    a, b = params[f"parts.{name}.lora_A"], params[f"parts.{name}.lora_B"]  # torch's own names
    assert a.shape == (4, 32) and b.shape == (32, 4) and a.requires_grad
    assert a.dtype == torch.float32 and a.device == lora.layout[name].device
    assert torch.equal(b, torch.zeros_like(b))
    assert lora.delta_factors(2.0)[name][1].abs().sum() == 0


def test_state_dict_round_trip_and_strictness(llama):
    lora = tiny.signed_lora(llama)
    other = ml.ModulatedLoRA(llama, r=4, alpha=8)
    other.load_state_dict(lora.state_dict())
    for (k1, p1), (k2, p2) in zip(lora.named_parameters(), other.named_parameters(), strict=True):
        assert k1 == k2 and torch.equal(p1, p2)
    state = lora.state_dict()
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(RuntimeError, match="Missing key"):  # torch's own strict load
        other.load_state_dict(bad)
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**state, key: torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="non-finite"):
        other.load_state_dict({**state, key: torch.full_like(state[key], float("nan"))})


def test_per_target_rank_and_alpha(llama):
    name = "model.layers.1.mlp.up_proj"
    lora = tiny.signed_lora(llama, r=4, alpha=8, rank_pattern={name: 2}, alpha_pattern={name: 1.0})
    part = lora.part(name)
    assert part.lora_A.shape == (2, 32) and part.lora_B.shape == (64, 2)
    layer = lora.layout[name].module
    h = torch.randn(3, layer.in_features)
    with torch.no_grad(), lora(llama, c=2.0):
        got = layer(h)
    assert not torch.allclose(got, F.linear(h, layer.weight, layer.bias))
    # This target's scale is its own alpha / its own r: 1 / 2 (the others' is 8 / 4).
    torch.testing.assert_close(got, _layer_reference(layer, h, part.lora_A, part.lora_B, 2.0, 0.5))
    with pytest.raises(ValueError, match="not targets"):
        ml.ModulatedLoRA(llama, r=4, rank_pattern={"lm_head": 2})


def test_dropout_only_in_training_mode(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama, dropout=0.5)
    with lora(llama, c=1.0):
        lora.eval()
        first, second = logits(llama, x), logits(llama, x)
        assert torch.equal(first, second)
        lora.train()
        assert not torch.equal(logits(llama, x), first)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "r must be a positive int"),
        ({"r": 2.5}, r"r must be a positive int|parameter .r."),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "gaussian"}, "init"),
        ({"dtype": torch.int8}, "dtype"),
        ({"targets": ("nothing_here",)}, "matched no linear layer"),
    ],
)
def test_bad_construction_raises_and_leaves_model(llama, kwargs, match):
    before = weights(llama)
    grads = [p.requires_grad for p in llama.parameters()]
    with pytest.raises((ValueError, TypeError), match=match):
        ml.ModulatedLoRA(llama, **kwargs)
    assert same_weights(llama, before)
    assert grads == [p.requires_grad for p in llama.parameters()]
