import pytest
import torch

import modlora as ml
from tests import tiny
from tests.helpers import adapter_deltas, hand_merged, logits, signed_pissa


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_history_equals_the_sum_of_its_rounds(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = logits(model, x)
    r1 = tiny.signed_lora(model, seed=1, r=4, alpha=8, layer_range=(0.0, 0.5))
    r2 = tiny.signed_lora(model, seed=2, r=2, alpha=1, layer_range=(0.25, 1.0))
    r3 = signed_pissa(model, r=3)
    rounds = [(r1, 1.0), (r2, -0.5), (r3, 2.0)]
    hist = ml.HistoryBake(model, rounds)
    assert hist.attached
    # Reference: W + Σ c_k ΔW_k, each round's delta written out from its raw tensors.
    torch.testing.assert_close(logits(model, x), logits(hand_merged(model, rounds), x))
    # Factor concatenation: B_cat @ A_cat is the sum of the rounds' deltas (fp32 products).
    name = next(n for n in hist.layout.names if n in r1.layout and n in r2.layout)
    a, b = hist.delta_factors(1.0)[name]
    expected = sum(adapter_deltas(adapter, c)[name] for adapter, c in rounds)
    torch.testing.assert_close(b @ a, expected.float())
    assert a.shape[0] == 4 + 2 + 3 == hist.ranks()[name]
    hist.remove()
    assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_nested_history_equals_the_hand_merged_model(arch):
    """A history holding a history: ``W + c_out · (Σ c_k ΔW_k) + ...``, summed by hand."""
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    lora1 = tiny.signed_lora(model, seed=1, r=4, alpha=8, layer_range=(0.0, 0.5))
    pissa = signed_pissa(model, r=3, layer_range=(0.25, 1.0))
    lora2 = tiny.signed_lora(model, seed=2, r=2, alpha=1)
    inner = ml.PiSSAHistoryBake(model, [(lora1, 1.0), (pissa, -0.5)], attach=False)
    outer = ml.HistoryBake(model, [(inner, 2.0), (lora2, -1.5)], attach=False)
    assert not outer.attached
    outer.attach(model)
    assert ml.PiSSAHistoryBake is ml.HistoryBake
    assert [r["kind"] for r in outer.round_info] == ["history", "lora"]
    for c in (1.0, -0.5):  # the history's own c scales every round it holds
        outer.set_coeff(c)
        rounds = [(lora1, c * 2.0 * 1.0), (pissa, c * 2.0 * -0.5), (lora2, c * -1.5)]
        torch.testing.assert_close(logits(model, x), logits(hand_merged(model, rounds), x))
    got = logits(model, x)
    outer.remove()
    assert not torch.allclose(got, logits(model, x))  # the nested delta is there to be seen


def _grads(model, new, x):
    with new(model, c=1.0):
        model(x).logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in new.named_parameters()}
    new.zero_grad(set_to_none=True)
    return grads


def test_a_new_round_trained_on_top_sees_the_baked_delta(llama):
    """The gradients of a new adapter on top of a history are those it would get on a model
    with the history's rounds merged by hand into the weights, not those on the base."""
    x = tiny.tokens()
    rounds = [(tiny.signed_lora(llama, seed=1, r=2), 1.0), (signed_pissa(llama, r=2), -0.5)]
    hist = ml.HistoryBake(llama, rounds)
    merged = hand_merged(llama, rounds)
    new = tiny.signed_lora(llama, seed=7, r=2)
    on_merged = tiny.signed_lora(merged, seed=7, r=2)
    on_merged.load_state_dict(new.state_dict())
    new.train()
    on_merged.train()
    on_history = _grads(llama, new, x)
    assert list(hist.parameters()) == []  # the history itself is frozen
    expected = _grads(merged, on_merged, x)
    hist.remove()
    on_base = _grads(llama, new, x)
    assert on_history.keys() == expected.keys() and all(
        g.abs().sum() > 0 for g in on_history.values()
    )
    for name in on_history:
        torch.testing.assert_close(on_history[name], expected[name])
    assert not all(torch.allclose(on_history[n], on_base[n]) for n in on_history)


def test_one_hook_per_target(llama):
    rounds = [(tiny.signed_lora(llama, seed=s, r=2), 1.0) for s in range(3)]
    hist = ml.HistoryBake(llama, rounds)
    counts = {len(t.module._forward_hooks) for t in hist.layout}
    assert counts == {1}
    hist.remove()


def test_gate_and_enabled_switch(llama):
    x = tiny.tokens()
    base = logits(llama, x)
    state = {"on": True}
    hist = ml.HistoryBake(
        llama, [(tiny.signed_lora(llama, seed=1, r=2), 1.0)], gate=lambda: state["on"]
    )
    on = logits(llama, x)
    assert not torch.equal(on, base)
    state["on"] = False
    assert torch.equal(logits(llama, x), base)
    state["on"] = True
    hist.enabled = False
    assert torch.equal(logits(llama, x), base)
    hist.enabled = True
    assert torch.equal(logits(llama, x), on)
    hist.remove()


@pytest.mark.parametrize(
    ("rounds", "error", "match"),
    [
        ([], ValueError, "at least one"),
        ([("not an adapter", 1.0)], TypeError, "not a modlora adapter"),
        ("bad-pair", TypeError, r"\(adapter, c\) pair"),
        ("nan", ValueError, "finite"),
        ("per-sample", ValueError, "scalar"),
        ("other-model", ValueError, "was built on"),
    ],
)
def test_bad_rounds_raise_and_attach_nothing(llama, rounds, error, match):
    lora = tiny.signed_lora(llama, seed=1, r=2)
    named = {
        "bad-pair": [(lora,)],
        "nan": [(lora, float("nan"))],
        "per-sample": [(lora, torch.tensor([1.0, 2.0]))],
        "other-model": [(tiny.signed_lora(tiny.llama(), seed=1, r=2), 1.0)],
    }
    rounds = named[rounds] if isinstance(rounds, str) else rounds
    with pytest.raises((error, TypeError), match=f"{match}|parameter 'rounds'"):
        ml.HistoryBake(llama, rounds)
    assert not any(m._forward_hooks for m in llama.modules())
