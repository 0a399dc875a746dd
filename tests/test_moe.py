"""Fused MoE expert weights (transformers 5: 3-D parameters) are targets like any linear layer.

Tiny Mixtral, Qwen3-MoE, OLMoE — ``(E, d_out, d_in)`` with ``F.linear`` — and GPT-OSS —
``(E, d_in, d_out)`` with ``x @ W`` — built from configs. The reference is always the model with
``W_e += c · scale · B_e @ A_e`` written into its weights by hand.
"""

import pytest
import torch
from torch import nn

import modlora as ml
from tests import tiny
from tests.checkpoint_files import claiming_rank, rewrite
from tests.helpers import assert_each_row_alone, hand_merged, logits, randomized

ARCHS = list(tiny.MOE_BUILDERS)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_includes_every_fused_expert_weight(arch):
    model = tiny.MOE_BUILDERS[arch]()
    layout = ml.find_targets(model)
    fused = {
        f"{name}.{param}"
        for name, module in model.named_modules()
        for param, p in module.named_parameters(recurse=False)
        if p.dim() == 3
    }
    assert fused and fused <= set(layout.names)
    for name in fused:
        t = layout[name]
        assert t.experts == 4 and t.transposed == (arch == "gpt_oss")
        assert t.dense_weight().shape == (4, t.d_out, t.d_in)
    covered = sum(t.weight.numel() for t in layout)
    linear = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n
    )
    assert covered / linear > 0.9  # the router and embeddings are all that is left
    only = ml.find_targets(model, targets=["experts"], exclude=["down_proj"])
    assert {n.rsplit(".", 1)[1] for n in only.names} == {"gate_up_proj"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["lora", "pissa"])
def test_hooked_equals_hand_merged_and_c0_is_the_base(arch, kind):
    model, x = tiny.MOE_BUILDERS[arch](), tiny.tokens()
    base = logits(model, x)
    if kind == "lora":
        adapter = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    else:
        adapter = randomized(ml.ModulatedPiSSA(model, r=2), std=0.5)
    part = adapter.part(next(t.name for t in adapter.layout if t.experts))
    assert part.factors()[0].shape[0] == 4  # per-expert factors
    with adapter(model, c=0.0):
        assert torch.equal(logits(model, x), base)
    with adapter(model, c=-1.5):
        hooked = logits(model, x)
    torch.testing.assert_close(hooked, logits(hand_merged(model, [(adapter, -1.5)]), x))
    assert not torch.allclose(hooked, base)
    assert torch.equal(logits(model, x), base)  # detached: the weights are the parameters again


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_gradients_flow_to_expert_factors_and_match_two_backwards(arch):
    model, x = tiny.MOE_BUILDERS[arch](), tiny.tokens(batch=2)
    lora = randomized(ml.ModulatedLoRA(model, r=2, targets=["experts"], init="signed"))
    lora.train()
    with lora(model, c=torch.tensor([1.0, -1.0])):
        model(x).logits.pow(2).mean().backward()
    together = {n: p.grad.clone() for n, p in lora.named_parameters()}
    assert all(g.abs().sum() > 0 for g in together.values())
    lora.zero_grad()
    for i, c in enumerate((1.0, -1.0)):
        with lora(model, c=c):
            (model(x[i : i + 1]).logits.pow(2).sum() / model(x).logits.numel()).backward()
    for n, p in lora.named_parameters():
        torch.testing.assert_close(p.grad, together[n])


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_c_on_fused_experts(arch):
    model, x = tiny.MOE_BUILDERS[arch](), tiny.tokens(batch=3)
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    cs = torch.tensor([1.0, 0.0, -2.0])
    assert_each_row_alone(model, lora, x, cs)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_history_and_merge_of_expert_weights(arch):
    model, x = tiny.MOE_BUILDERS[arch](), tiny.tokens()
    one = randomized(ml.ModulatedLoRA(model, r=2, init="signed"), seed=1)
    two = randomized(ml.ModulatedPiSSA(model, r=2, targets=["experts"]), std=0.5, seed=2)
    hist = ml.HistoryBake(model, [(one, 1.0), (two, -0.5)])
    a, b, _ = hist.part(f"{hist.layout.names[4]}").factors()
    assert a.dim() == 3 and a.shape[-2] == 4  # ranks 2 + 2 concatenated per expert
    expected = logits(hand_merged(model, [(one, 1.0), (two, -0.5)]), x)
    torch.testing.assert_close(logits(model, x), expected)
    hist.remove()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with one(model, c=0.75):
        hooked = logits(model, x)
    report = ml.merge(model, one, c=0.75)
    assert report.applied == report.attempted == len(one.layout)
    torch.testing.assert_close(logits(model, x), hooked)
    ml.unmerge(model, one)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_identical(arch, tmp_path):
    model, x = tiny.MOE_BUILDERS[arch](), tiny.tokens()
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed", rank_pattern=None))
    lora.save(tmp_path / "moe.safetensors", c=0.5)
    meta = ml.read_metadata(tmp_path / "moe.safetensors")
    fused = next(t for t in lora.layout if t.experts)
    assert meta["shapes"][fused.name] == [fused.d_in, fused.d_out, 2]
    same = ml.load_adapter(model, tmp_path / "moe.safetensors")
    with lora(model, c=0.5):
        expected = logits(model, x)
    with same(model, c=0.5):
        assert torch.equal(logits(model, x), expected)
    other = tiny.MOE_BUILDERS[arch](num_hidden_layers=2, **_other_experts(arch))
    with pytest.raises(ml.CheckpointError, match=r"experts=4\) vs model \(.*experts=8\)"):
        ml.load_adapter(other, tmp_path / "moe.safetensors")


def _other_experts(arch):
    return {"num_local_experts": 8} if arch in ("mixtral", "gpt_oss") else {"num_experts": 8}


def test_a_fused_weight_without_a_declared_orientation_raises_naming_it():
    class Experts(nn.Module):  # custom code: 3-D weights, no is_transposed declaration
        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.w = nn.Parameter(torch.randn(2, 6, 6))

    model = nn.Sequential(nn.Linear(6, 6), Experts())
    with pytest.raises(
        ValueError, match=r"orientation of fused expert weight '1.w'.*is_transposed"
    ):
        ml.ModulatedLoRA(model, r=2)
    assert ml.ModulatedLoRA(model, r=2, exclude=[r"^1\.w$"]).layout.names == ["0"]


def test_calibrated_pissa_selects_per_expert():
    model, x = tiny.mixtral(), tiny.tokens(batch=4)
    layout = ml.find_targets(model, targets=["experts"])
    calib = ml.collect_calibration(model, layout, [x])
    name = layout.names[0]
    seen = [calib.for_target(name, e)["all"].count for e in range(4)]
    assert sum(seen) == x.numel() * 2  # every token reaches its top-2 experts
    pissa = ml.ModulatedPiSSA(model, r=2, selection_score="wanda", calibration=calib,
                              targets=["experts"])  # fmt: skip
    assert pissa.selected[name].shape == (4, 2)
    u, s, vh = pissa.singular_factors(name)
    assert u.shape == (4, layout[name].d_out, 2) and vh.shape == (4, 2, layout[name].d_in)


@pytest.mark.parametrize("arch", ["opt", "qwen2_moe"])
def test_per_sample_c_on_flattened_token_inputs(arch):
    """OPT's MLP and Qwen2-MoE's shared expert see (batch·seq, d): rows map to samples."""
    model, x = getattr(tiny, arch)(), tiny.tokens(batch=3)
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    flat = [t.name for t in lora.layout if "fc1" in t.name or "shared_expert." in t.name]
    assert flat
    cs = torch.tensor([0.5, -1.0, 2.0])
    assert_each_row_alone(model, lora, x, cs)


def test_per_sample_c_on_routed_expert_layers_raises_and_scalar_c_works():
    """SwitchTransformers' experts are nn.Linear layers that see only their routed tokens."""
    model = tiny.switch()
    lora = randomized(ml.ModulatedLoRA(model, r=2, targets=["experts"], init="signed"))
    assert all(t.routed for t in lora.layout)
    x = tiny.tokens(batch=2)
    kwargs = {"input_ids": x, "decoder_input_ids": x}
    with torch.no_grad():
        base = model(**kwargs).logits
        with (
            lora(model, c=torch.tensor([1.0, -1.0])),
            pytest.raises(ValueError, match=r"expert inside an expert list.*router"),
        ):
            model(**kwargs)
        with lora(model, c=1.0):
            assert not torch.allclose(model(**kwargs).logits, base)
        assert torch.equal(model(**kwargs).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_target_parameters_round_trip_with_real_peft(arch, tmp_path):
    from peft import PeftModel

    model, x = tiny.MOE_BUILDERS[arch](), tiny.tokens()
    lora = randomized(ml.ModulatedLoRA(model, r=2, alpha=4, init="signed"))
    with lora(model, c=0.7):
        hooked = logits(model, x)
    out = ml.export_peft(lora, tmp_path / "peft", c=0.7)
    config = __import__("json").loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(t.name for t in lora.layout if t.experts)
    peft_model = PeftModel.from_pretrained(tiny.MOE_BUILDERS[arch](), str(out)).eval()
    torch.testing.assert_close(logits(peft_model, x), hooked)
    back = ml.import_peft(tiny.MOE_BUILDERS[arch](), out)
    assert back.layout.names == lora.layout.names
    with back(back.model, c=1.0):
        torch.testing.assert_close(logits(back.model, x), hooked)


def _save(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_offline_merge_of_a_folder_saved_by_the_model_across_shards(arch, tmp_path):
    """transformers saves Mixtral / Qwen3-MoE / OLMoE experts per expert (2-D keys) and GPT-OSS
    fused; small shards split one fused weight's experts over several files."""
    import json

    import transformers as tf

    model, x = tiny.MOE_BUILDERS[arch](), tiny.tokens()
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    with lora(model, c=0.7):
        hooked = logits(model, x)
    base = _save(model, tmp_path / "base", max_shard_size="20KB")
    shards = set(
        json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    assert len(shards) > 3
    lora.save(tmp_path / "a.safetensors")
    report = ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path / "out", c=0.7)
    per_expert = arch != "gpt_oss"
    fused = [t for t in lora.layout if t.experts]
    linear = len(lora.layout) - len(fused)
    # per-expert storage: gate_up → 2 tensors (gate, up) per expert, down → 1 per expert
    expected = linear + (
        sum(4 * (2 if "gate_up" in t.name else 1) for t in fused) if per_expert else len(fused)
    )
    assert report.attempted == report.applied == expected
    merged = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    torch.testing.assert_close(logits(merged, x), hooked)


@pytest.mark.slow
def test_offline_merge_of_fused_keys_and_of_an_unrecognised_layout(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file, save_file

    model, x = tiny.mixtral(), tiny.tokens()
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    with lora(model, c=-1.0):
        hooked = logits(model, x)
    lora.save(tmp_path / "a.safetensors")
    fused = tmp_path / "fused"  # the model's own (fused) names on disk
    fused.mkdir()
    model.config.save_pretrained(fused)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    report = ml.merge_checkpoint(fused, tmp_path / "a.safetensors", tmp_path / "out", c=-1.0)
    assert report.applied == len(lora.layout)
    merged = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    torch.testing.assert_close(logits(merged, x), hooked)

    broken = _save(model, tmp_path / "broken")  # one expert's weight missing on disk
    weights = load_file(str(broken / "model.safetensors"))
    weights.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ml.MergeError, match=r"experts.3.w2.*unrecognised layout"):
        ml.merge_checkpoint(broken, tmp_path / "a.safetensors", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_expert_factors_are_validated_on_load(tmp_path):
    from safetensors.torch import load_file

    model = tiny.mixtral()
    lora = randomized(ml.ModulatedLoRA(model, r=2, targets=["experts"], init="signed"))
    lora.save(tmp_path / "a.safetensors")
    name = lora.layout.names[0]
    # The metadata claims rank 3; A (E, 2, d_in) and B (E, d_out, 2) say 2.
    claiming_rank(tmp_path / "a.safetensors", tmp_path / "r.safetensors", name, 3)
    with pytest.raises(
        ml.CheckpointError, match=rf"{name}.*lora_A \(4, 2, 32\).*metadata says r=3"
    ):
        ml.load_adapter(model, tmp_path / "r.safetensors")
    b = load_file(str(tmp_path / "a.safetensors"))[f"{name}.lora_B"]
    fewer = {f"{name}.lora_B": b[:3]}  # 3 experts' B, 4 experts' A
    rewrite(tmp_path / "a.safetensors", tmp_path / "e.safetensors", tensors=fewer)
    with pytest.raises(ml.CheckpointError, match=rf"{name}.*expert counts differ \(4 vs 3\)"):
        ml.load_adapter(model, tmp_path / "e.safetensors")
    assert not ml.find_adapters(model)
