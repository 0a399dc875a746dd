import pytest
import torch

import modlora as ml
from tests import tiny
from tests.helpers import logits


def _lora(model, seed, **kw):
    return tiny.signed_lora(model, seed=seed, **kw)


def _pissa(model, **kw):
    pissa = ml.ModulatedPiSSA(model, **kw)
    with torch.no_grad():
        for _, p in pissa.named_parameters():
            p.normal_(0, 0.3)
    return pissa


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_history_equals_the_sum_of_its_rounds(arch):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = logits(model, x)
    r1 = _lora(model, 1, r=4, alpha=8, layer_range=(0.0, 0.5))
    r2 = _lora(model, 2, r=2, alpha=1, layer_range=(0.25, 1.0))
    r3 = _pissa(model, r=3)
    rounds = [(r1, 1.0), (r2, -0.5), (r3, 2.0)]
    # Reference: every round attached at once with its own c (hooks add up).
    for adapter, c in rounds:
        adapter.attach(model, c)
    summed = logits(model, x)
    for adapter, _ in rounds:
        adapter.detach()
    hist = ml.HistoryBake(model, rounds)
    assert hist.attached
    torch.testing.assert_close(logits(model, x), summed)
    # Exact factor concatenation: B_cat @ A_cat is the sum of the rounds' deltas.
    name = next(n for n in hist.layout.names if n in r1.layout and n in r2.layout)
    a, b = hist.delta_factors(1.0)[name]
    expected = sum(ad.delta_factors(c)[name][1] @ ad.delta_factors(c)[name][0] for ad, c in rounds)
    torch.testing.assert_close(b @ a, expected)
    assert a.shape[0] == 4 + 2 + 3 == hist.ranks()[name]
    hist.remove()
    assert torch.equal(logits(model, x), base)


def test_one_hook_per_target(llama):
    rounds = [(_lora(llama, s, r=2), 1.0) for s in range(3)]
    hist = ml.HistoryBake(llama, rounds)
    counts = {len(t.module._forward_hooks) for t in hist.layout}
    assert counts == {1}
    hist.remove()


def test_gate_and_enabled_switch(llama):
    x = tiny.tokens()
    base = logits(llama, x)
    state = {"on": True}
    hist = ml.HistoryBake(llama, [(_lora(llama, 1, r=2), 1.0)], gate=lambda: state["on"])
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


def test_history_with_a_new_round_training_on_top(llama):
    x = tiny.tokens()
    hist = ml.HistoryBake(llama, [(_lora(llama, 1, r=2), 1.0)])
    new = ml.ModulatedLoRA(llama, r=2, init="signed")
    with new(llama, c=1.0):
        llama(x).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in new.parameters())
    assert list(hist.parameters()) == []
    hist.remove()


def test_nested_history_and_compatible_name(llama):
    inner = ml.PiSSAHistoryBake(llama, [(_pissa(llama, r=2), 1.0)], attach=False)
    outer = ml.HistoryBake(llama, [(inner, 2.0), (_lora(llama, 3, r=2), 1.0)], attach=False)
    assert ml.PiSSAHistoryBake is ml.HistoryBake
    assert [r["kind"] for r in outer.round_info] == ["history", "lora"]
    assert not outer.attached


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
    lora = _lora(llama, 1, r=2)
    named = {
        "bad-pair": [(lora,)],
        "nan": [(lora, float("nan"))],
        "per-sample": [(lora, torch.tensor([1.0, 2.0]))],
        "other-model": [(_lora(tiny.llama(), 1, r=2), 1.0)],
    }
    rounds = named[rounds] if isinstance(rounds, str) else rounds
    with pytest.raises((error, TypeError), match=f"{match}|parameter 'rounds'"):
        ml.HistoryBake(llama, rounds)
    assert not any(m._forward_hooks for m in llama.modules())
