import copy

import pytest
import torch

import modlora as ml
from tests import tiny


def _signed(model, **kw):
    return tiny.signed_lora(model, **kw)


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("c", [-2.5, 1.0, 7.0])
def test_zero_init_is_bit_identical_at_any_c(arch, c):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = _logits(model, x)
    lora = ml.ModulatedLoRA(model, r=4)
    with lora(model, c=c):
        assert torch.equal(_logits(model, x), base)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_c_zero_is_bit_identical_and_hooks_go_away(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = _logits(model, x)
    lora = _signed(model)
    with lora(model, c=0.0):
        assert torch.equal(_logits(model, x), base)
    with lora(model, c=1.0):
        assert not torch.equal(_logits(model, x), base)
    assert torch.equal(_logits(model, x), base)
    assert all(not t.module._forward_hooks for t in lora.layout)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma", "gpt_neox", "bert"])
def test_hooked_forward_equals_hand_edited_weights(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    lora = _signed(model, layer_range=(0.25, 1.0))
    with lora(model, c=-1.5):
        hooked = _logits(model, x)
    edited = copy.deepcopy(model)
    modules = dict(edited.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.delta_factors(-1.5).items():
            t = lora.layout[name]
            delta = b @ a  # (d_out, d_in)
            modules[name].weight += delta.T if t.transposed else delta
    torch.testing.assert_close(_logits(edited, x), hooked)


def test_delta_is_linear_in_c(llama):
    x = tiny.tokens()
    base = _logits(llama, x)
    lora = _signed(
        llama, targets=(r"mlp\.down_proj$",), layer_range=(3, 4)
    )  # one layer: output is linear in ΔW
    deltas = {}
    for c in (1.0, 2.0, -3.0):
        with lora(llama, c=c):
            deltas[c] = _logits(llama, x) - base
    # fp32: the logits are linear in the last layer's ΔW up to RMSNorm; use the layer output itself.
    target = lora.layout["model.layers.3.mlp.down_proj"].module
    h = torch.randn(5, target.in_features)
    outs = {}
    for c in (1.0, 2.0, -3.0):
        with lora(llama, c=c), torch.no_grad():
            outs[c] = target(h) - torch.nn.functional.linear(h, target.weight, target.bias)
    torch.testing.assert_close(outs[2.0], 2 * outs[1.0])
    torch.testing.assert_close(outs[-3.0], -3 * outs[1.0])
    assert not torch.equal(deltas[1.0], torch.zeros_like(deltas[1.0]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_sample_c_equals_each_row_alone(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens(batch=3)
    lora = _signed(model)
    cs = torch.tensor([1.0, -2.0, 0.0])
    with lora(model, c=cs):
        batched = _logits(model, x)
    for i, c in enumerate(cs.tolist()):
        with lora(model, c=c):
            torch.testing.assert_close(batched[i : i + 1], _logits(model, x[i : i + 1]))


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
    lora = _signed(llama)
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
    lora = ml.ModulatedLoRA(llama, r=4, alpha=8, rank_pattern={name: 2}, alpha_pattern={name: 1.0})
    a, b, scale = lora.part(name).factors()
    assert a.shape == (2, 32) and b.shape == (64, 2) and scale == 0.5
    with pytest.raises(ValueError, match="not targets"):
        ml.ModulatedLoRA(llama, r=4, rank_pattern={"lm_head": 2})


def test_dropout_only_in_training_mode(llama):
    x = tiny.tokens()
    lora = _signed(llama, dropout=0.5)
    with lora(llama, c=1.0):
        lora.eval()
        first, second = _logits(llama, x), _logits(llama, x)
        assert torch.equal(first, second)
        lora.train()
        assert not torch.equal(_logits(llama, x), first)


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
    before = _weights(llama)
    grads = [p.requires_grad for p in llama.parameters()]
    with pytest.raises((ValueError, TypeError), match=match):
        ml.ModulatedLoRA(llama, **kwargs)
    assert _same_weights(llama, before)
    assert grads == [p.requires_grad for p in llama.parameters()]
