"""Live merge / unmerge (modlora/merge.py): verified against the hooks, bit-exact undo, loud."""

import importlib

import pytest
import torch
from torch import nn

import modlora as ml
from tests import tiny
from tests.helpers import (
    adapter_deltas,
    hand_merged,
    logits,
    same_weights,
    signed_pissa,
    two_round_history,
    weights,
)

merge_mod = importlib.import_module("modlora.merge")  # `modlora.merge` is also the function


KINDS = {"lora": tiny.signed_lora, "pissa": signed_pissa, "history": two_round_history}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["lora", "pissa", "history"])
def test_merge_matches_hooks_and_unmerge_is_exact(arch, kind):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    adapter = KINDS[kind](model)
    before = weights(model)
    expected = hand_merged(model, [(adapter, -1.5)]).state_dict()
    with adapter(model, c=-1.5):
        hooked = logits(model, x)
    assert not torch.equal(hooked, logits(model, x))  # the delta is visible

    report = ml.merge(model, adapter, c=-1.5)

    assert report.attempted == report.applied == len(adapter.layout)
    assert report.kind == kind and report.c == -1.5
    assert report.targets == tuple(adapter.layout.names)
    assert report.worst_rel_error < 1e-4 and report.below_resolution == ()
    torch.testing.assert_close(logits(model, x), hooked)
    # The merged weights themselves: W + ΔW(c), the delta written out from the raw tensors.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    ml.unmerge(model, adapter)
    assert same_weights(model, before)


def test_store_on_device_is_also_exact(llama):
    lora = tiny.signed_lora(llama)
    before = weights(llama)
    ml.merge(llama, lora, 2.0, store="device")
    assert not same_weights(llama, before)
    ml.unmerge(llama, lora)
    assert same_weights(llama, before)


def test_zero_delta_merges_to_the_identical_weights(llama):
    lora = ml.ModulatedLoRA(llama, r=4)  # init="zero": B = 0
    before = weights(llama)
    report = ml.merge(llama, lora, 3.0)
    assert same_weights(llama, before)
    assert report.worst_rel_error == 0.0 and report.worst_target is None


def test_deployed_c_is_used_when_c_is_none(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama)
    with pytest.raises(ValueError, match="deployed_c"):
        ml.merge(llama, lora, c=None)
    lora.deployed_c = 0.5
    with lora(llama, c=0.5):
        hooked = logits(llama, x)
    assert ml.merge(llama, lora, c=None).c == 0.5
    torch.testing.assert_close(logits(llama, x), hooked)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_forced_verification_miss_leaves_the_whole_model_unchanged(arch, monkeypatch):
    model = tiny.BUILDERS[arch]()
    lora = tiny.signed_lora(model)
    before = weights(model)
    victim = lora.layout.names[5]
    real = merge_mod.merged_weight
    calls = []

    def broken(weight, a, b):
        calls.append(1)
        out = real(weight, a, b)
        return out + 0.1 if len(calls) == 6 else out  # the 6th target merges wrongly

    monkeypatch.setattr(merge_mod, "merged_weight", broken)
    with pytest.raises(ml.MergeError, match=r"verification miss.*restored 6 weight\(s\)") as info:
        ml.merge(model, lora, 1.0)
    assert info.value.target == victim and victim in str(info.value)
    assert same_weights(model, before)
    monkeypatch.setattr(merge_mod, "merged_weight", real)
    ml.merge(model, lora, 1.0)  # nothing was registered by the failed merge
    ml.unmerge(model, lora)
    assert same_weights(model, before)


def test_a_merge_that_silently_keeps_the_base_weight_is_caught(gpt2, monkeypatch):
    lora = tiny.signed_lora(gpt2)
    before = weights(gpt2)
    monkeypatch.setattr(merge_mod, "merged_weight", lambda w, a, b: w.clone())  # `except: return W`
    with pytest.raises(ml.MergeError, match=r"c_attn.*verification miss.*model unchanged"):
        ml.merge(gpt2, lora, 1.0)
    assert same_weights(gpt2, before)


def test_a_failing_layer_forward_is_wrapped_and_restored(llama, monkeypatch):
    lora = tiny.signed_lora(llama)
    before = weights(llama)
    name = lora.layout.names[3]
    module = lora.layout[name].module
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) == 2:  # the forward after the weight was written
            raise RuntimeError("device lost")
        return nn.Linear.forward(module, x)

    monkeypatch.setattr(module, "forward", flaky)
    with pytest.raises(ml.MergeError, match=rf"{name}.*RuntimeError: device lost.*unchanged"):
        ml.merge(llama, lora, 1.0)
    assert same_weights(llama, before)


def test_non_finite_result_raises_and_restores():
    model = tiny.llama().half()
    lora = tiny.signed_lora(model, layer_range=(2, 4))
    with torch.no_grad():
        lora.part(lora.layout.names[-1]).lora_B.fill_(1e6)  # the last target overflows fp16
    before = weights(model)
    with pytest.raises(ml.MergeError, match=r"not finite in torch.float16.*model unchanged"):
        ml.merge(model, lora, 1.0)
    assert same_weights(model, before)


def test_bf16_merge_accumulates_in_fp32_and_rounds_once():
    model = tiny.llama().to(torch.bfloat16)
    lora = tiny.signed_lora(model, std=0.02)
    name = lora.layout.names[0]
    w = lora.layout[name].module.weight.detach().clone()
    delta = adapter_deltas(lora, 1.0)[name].float()  # c · alpha/r · B @ A, by hand
    truth = w.float() + delta
    naive = w + delta.to(torch.bfloat16)  # a bf16 add of a bf16 delta: two roundings
    report = ml.merge(model, lora, 1.0)
    merged = lora.layout[name].module.weight.detach()
    ours_err, naive_err = (merged.float() - truth).abs(), (naive.float() - truth).abs()
    assert bool((ours_err <= naive_err).all())  # the nearest bf16 value to the truth
    assert float(ours_err.sum()) < float(naive_err.sum())
    assert not torch.equal(merged, w)
    assert report.below_resolution == ()


def test_a_delta_below_bf16_resolution_is_reported(llama):
    model = llama.to(torch.bfloat16)
    lora = tiny.signed_lora(model, std=1e-7)
    report = ml.merge(model, lora, 1.0)
    assert set(report.below_resolution) == set(lora.layout.names)


def test_per_sample_or_bad_c_is_refused(llama):
    lora = tiny.signed_lora(llama)
    before = weights(llama)
    with pytest.raises(ValueError, match="scalar c"):
        ml.merge(llama, lora, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="finite"):
        ml.merge(llama, lora, float("nan"))
    with pytest.raises(ValueError, match="store"):
        ml.merge(llama, lora, 1.0, store="disk")
    assert same_weights(llama, before)


def test_attached_adapter_is_refused(llama):
    lora = tiny.signed_lora(llama)
    before = weights(llama)
    lora.attach(llama, 1.0)
    with pytest.raises(ml.AdapterStateError, match="attached.*twice"):
        ml.merge(llama, lora)
    lora.detach()
    hist = ml.HistoryBake(llama, [(lora, 1.0)])  # attaches on construction
    with pytest.raises(ml.AdapterStateError, match=r"remove\(\)"):
        ml.merge(llama, hist)
    hist.remove()  # while attached, the model's state_dict holds the history's tensors too
    assert same_weights(llama, before)


def test_merging_twice_or_unmerging_what_is_not_merged_raises(llama):
    lora = tiny.signed_lora(llama)
    before = weights(llama)
    with pytest.raises(ml.AdapterStateError, match="not merged"):
        ml.unmerge(llama, lora)
    ml.merge(llama, lora)
    merged = weights(llama)
    with pytest.raises(ml.AdapterStateError, match="already merged"):
        ml.merge(llama, lora)
    with pytest.raises(ml.AdapterStateError, match="merged into the model's weights"):
        lora.attach(llama, 1.0)
    with (
        pytest.raises(ml.AdapterStateError, match="merged into the model's weights"),
        lora(llama, c=1.0),
    ):
        pass
    assert same_weights(llama, merged) and not lora.attached
    ml.unmerge(llama, lora)
    assert same_weights(llama, before)
    with lora(llama, c=1.0):  # attachable again once unmerged
        assert lora.attached


def test_adapter_from_another_model_is_refused():
    model, other = tiny.llama(), tiny.llama(seed=1)
    lora = tiny.signed_lora(model)
    before = weights(other)
    with pytest.raises(ValueError, match="was built on"):
        ml.merge(other, lora)
    assert same_weights(other, before)


def test_stacked_merges_unmerge_last_in_first_out(llama):
    first, second = (
        tiny.signed_lora(llama, seed=1),
        tiny.signed_lora(llama, seed=2, layer_range=(1, 3)),
    )
    before = weights(llama)
    ml.merge(llama, first, 1.0)
    after_first = weights(llama)
    ml.merge(llama, second, -1.0)
    with pytest.raises(ml.AdapterStateError, match="merged later on the same targets"):
        ml.unmerge(llama, first)
    ml.unmerge(llama, second)
    assert same_weights(llama, after_first)
    ml.unmerge(llama, first)
    assert same_weights(llama, before)


def test_unmerge_refuses_weights_changed_since_the_merge(llama):
    lora = tiny.signed_lora(llama)
    before = weights(llama)
    ml.merge(llama, lora)
    weight = lora.layout[lora.layout.names[2]].module.weight
    with torch.no_grad():
        weight[0, 0] += 1.0  # a training step or an edit after the merge
    edited = weights(llama)
    with pytest.raises(RuntimeError, match=r"changed since the merge.*force=True"):
        ml.unmerge(llama, lora)
    assert same_weights(llama, edited)
    ml.unmerge(llama, lora, force=True)
    assert same_weights(llama, before)


def test_unmerge_refuses_a_dtype_change(llama):
    lora = tiny.signed_lora(llama)
    ml.merge(llama, lora)
    llama.to(torch.float64)
    with pytest.raises(RuntimeError, match=r"float64.*float32 when merged"):
        ml.unmerge(llama, lora)


def test_tied_weight_is_refused(gpt2):
    lora = tiny.signed_lora(gpt2, targets=["lm_head"], exclude=())  # GPT-2 ties lm_head to wte
    before = weights(gpt2)
    with pytest.raises(ml.MergeError, match=r"lm_head.*shared with \['transformer.wte.weight'\]"):
        ml.merge(gpt2, lora)
    assert same_weights(gpt2, before)


def _quantized(llama, lora):
    name = lora.layout.names[-1]
    module = lora.layout[name].module
    module.weight = nn.Parameter(module.weight.detach().to(torch.int8), requires_grad=False)
    return rf"{name}.*quantized.*torch.int8"


def _shape_mismatch(llama, lora):
    name = lora.layout.names[1]
    module = lora.layout[name].module
    module.weight = nn.Parameter(torch.zeros(module.out_features, module.in_features + 1))
    return rf"{name}.*shape mismatch: weight \(16, 33\)"


def _replaced_layer(llama, lora):
    llama.model.layers[0].self_attn.q_proj = nn.Linear(32, 32, bias=False)
    return rf"{lora.layout.names[0]}.*no longer has this layer"


def _non_finite_factors(llama, lora):
    with torch.no_grad():
        lora.part(lora.layout.names[4]).lora_A[0, 0] = float("nan")
    return "non-finite"


@pytest.mark.parametrize(
    "spoil", [_quantized, _shape_mismatch, _replaced_layer, _non_finite_factors]
)
def test_a_target_that_cannot_merge_is_refused_before_anything_changes(llama, spoil):
    lora = tiny.signed_lora(llama)
    match = spoil(llama, lora)
    before = weights(llama)
    with pytest.raises(ml.MergeError, match=match):
        ml.merge(llama, lora)
    assert same_weights(llama, before)


def test_training_mode_dropout_does_not_disturb_the_probe(llama):
    x = tiny.tokens()
    lora = tiny.signed_lora(llama, dropout=0.5)
    with lora(llama, c=1.0):
        hooked = logits(llama, x)  # eval mode: no dropout
    lora.train()
    ml.merge(llama, lora)
    assert lora.training
    torch.testing.assert_close(logits(llama, x), hooked)


def test_not_an_adapter_is_refused(llama):
    with pytest.raises(TypeError, match="adapter"):  # beartype or merge's own check
        ml.merge(llama, object())


def test_history_of_a_merged_round_refuses_to_attach(llama):
    """A merged round inside a history would add its delta a second time."""
    lora = tiny.signed_lora(llama)
    ml.merge(llama, lora, c=1.0)
    merged = weights(llama)
    with pytest.raises(ml.AdapterStateError, match="merged into the model's weights"):
        ml.HistoryBake(llama, [(lora, 1.0)])
    assert not any(m._forward_hooks for m in llama.modules())
    assert same_weights(llama, merged)
    ml.unmerge(llama, lora)
    ml.HistoryBake(llama, [(lora, 1.0)]).remove()  # fine once unmerged
