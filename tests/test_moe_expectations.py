"""What a user of MoE models expects from checkpoints and the offline merge, beyond the happy
path of ``test_moe.py``: a wrong input is named, and nothing is written."""

import pytest
import torch
from safetensors.torch import save_file

import modlora as ml
from tests import tiny
from tests.helpers import randomized


@pytest.fixture(scope="module")
def mixtral_adapter(tmp_path_factory):
    """A LoRA on every target of the tiny Mixtral (4 experts), saved."""
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    randomized(ml.ModulatedLoRA(tiny.mixtral(), r=2, init="signed")).save(path)
    return path


@pytest.mark.parametrize(
    "other, what",
    [
        (dict(num_local_experts=8), r"experts.*8.*4|4.*experts.*8"),
        (dict(intermediate_size=32), r"shape|d_in|d_out"),
    ],
    ids=["more-experts", "narrower-experts"],
)
def test_offline_merge_onto_a_folder_with_other_experts_names_the_target(
    mixtral_adapter, tmp_path, other, what
):
    """A Mixtral folder whose experts differ from the adapter's (count or width) is refused with
    a MergeError naming the fused target — not a bare KeyError / RuntimeError — and no output."""
    tiny.mixtral(**other).save_pretrained(tmp_path / "base")
    with pytest.raises(ml.MergeError, match=r"experts\.(gate_up|down)_proj") as info:
        ml.merge_checkpoint(tmp_path / "base", mixtral_adapter, tmp_path / "out")
    assert __import__("re").search(what, str(info.value)), str(info.value)
    assert not (tmp_path / "out").exists()


def test_offline_merge_of_expert_targets_onto_a_dense_model_says_so(mixtral_adapter, tmp_path):
    """A Llama folder (with its config.json) has no fused experts: the error says that, instead
    of asking for a config.json the folder has."""
    tiny.llama().save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / "config.json").is_file()
    with pytest.raises(ml.MergeError, match=r"experts\.\w+_proj") as info:
        ml.merge_checkpoint(tmp_path / "base", mixtral_adapter, tmp_path / "out")
    assert "needs the folder's config.json" not in str(info.value)
    assert "LlamaForCausalLM" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_read_metadata_of_a_foreign_safetensors_file_raises(tmp_path):
    """A safetensors file that is neither a modlora v1 file nor a seed (legacy) file is not
    reported as a legacy checkpoint: read_metadata raises like load_adapter does."""
    path = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(path), metadata={"a": "b"})
    with pytest.raises(ml.CheckpointError, match="not a modlora checkpoint"):
        ml.read_metadata(path)
    with pytest.raises(ml.CheckpointError, match="not a modlora checkpoint"):
        ml.load_adapter(tiny.llama(), path)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_offline_merge_checks_the_base_of_experts_stored_per_expert(arch, tmp_path):
    """save_pretrained splits fused experts per expert on disk; the base check still compares
    them: a PiSSA adapter (computed from the base's SVD) is refused on another base, as
    load_adapter refuses it, and merges onto its own."""
    build = tiny.MOE_BUILDERS[arch]
    pissa = randomized(ml.ModulatedPiSSA(build(), r=2, targets=["experts"]), std=0.5)
    pissa.save(tmp_path / "p.safetensors")
    build(seed=5).save_pretrained(tmp_path / "other")
    with pytest.raises(ml.CheckpointError, match=r"different base.*experts\.(gate_up|down)_proj"):
        ml.load_adapter(build(seed=5), tmp_path / "p.safetensors")
    with pytest.raises(ml.CheckpointError, match=r"different base.*experts\.(gate_up|down)_proj"):
        ml.merge_checkpoint(tmp_path / "other", tmp_path / "p.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    build().save_pretrained(tmp_path / "own")
    report = ml.merge_checkpoint(tmp_path / "own", tmp_path / "p.safetensors", tmp_path / "out")
    assert report.applied == report.attempted > 0


def test_paths_starting_with_a_tilde_mean_the_home_folder(tmp_path, monkeypatch):
    """``~/…`` is the user's home in every path argument, as in a shell: save / load /
    read_metadata / export_peft / import_peft / merge_checkpoint — never a folder named ``~``
    in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    model = tiny.mixtral()
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    assert lora.save("~/a.safetensors", c=0.5) == home / "a.safetensors"
    assert ml.read_metadata("~/a.safetensors")["c"] == 0.5
    assert ml.load_adapter(tiny.mixtral(), "~/a.safetensors").deployed_c == 0.5
    assert ml.export_peft(lora, "~/peft", c=0.5) == home / "peft"
    assert ml.import_peft(tiny.mixtral(), "~/peft").layout.names == lora.layout.names
    model.save_pretrained(home / "base")
    ml.merge_checkpoint("~/base", "~/a.safetensors", "~/merged", c=None)
    assert (home / "merged" / "config.json").is_file()
    assert not (work / "~").exists()


@pytest.mark.parametrize("score", ["act_only", "wanda"])
def test_pissa_on_experts_that_saw_no_calibration_tokens_names_them(score):
    """With many experts and little calibration data some experts are routed no token: an
    activation score cannot rank their directions. The error names the target and the experts
    (not a bare 'no calibration rows were collected for this split') and leaves the model."""
    from tests.helpers import assert_same_state, model_state

    model = tiny.mixtral(num_local_experts=16, num_experts_per_tok=1)
    layout = ml.find_targets(model, targets=["experts"])
    calibration = ml.collect_calibration(model, layout, [tiny.tokens(batch=1, seq=2)])
    before = model_state(model)
    with pytest.raises(ValueError, match=r"experts\.(gate_up|down)_proj\[\d+\].*s_only"):
        ml.ModulatedPiSSA(
            model, r=2, targets=["experts"], selection_score=score, calibration=calibration
        )
    assert_same_state(model, before)


def test_import_of_a_peft_adapter_on_the_router_names_it(tmp_path):
    """PEFT's ``all-linear`` on a transformers-5 Mixtral also adapts the router's weight
    (``target_parameters`` ``gate.weight``). modlora adapts no router: import_peft refuses it
    with a ValueError naming the target and its module type, not a bare KeyError."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules="all-linear", target_parameters=["gate.weight"])
    get_peft_model(tiny.mixtral(), config).save_pretrained(tmp_path / "peft")
    model = tiny.mixtral()
    with pytest.raises(ValueError, match=r"mlp\.gate.*MixtralTopKRouter"):
        ml.import_peft(model, tmp_path / "peft")
    assert not ml.find_adapters(model)


def test_offline_merge_of_experts_stored_fused_under_other_names(tmp_path):
    """GraniteMoE keeps its fused experts as ``experts.gate_up_proj`` in the model but saves
    them as 3-D ``block_sparse_moe.input_linear.weight`` / ``output_linear.weight``: the merged
    folder loads and gives the hooked logits; a PiSSA adapter is checked against that base."""
    import transformers as tf

    config = tf.GraniteMoeConfig(**{**tiny.MOE, "vocab_size": tiny.VOCAB}, num_local_experts=4)
    torch.manual_seed(0)
    model, x = tf.GraniteMoeForCausalLM(config).eval(), tiny.tokens()
    assert any(t.experts for t in ml.find_targets(model))
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    with torch.no_grad(), lora(model, c=0.7):
        hooked = model(x).logits
    model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    lora.save(tmp_path / "a.safetensors")
    report = ml.merge_checkpoint(
        tmp_path / "base", tmp_path / "a.safetensors", tmp_path / "out", c=0.7
    )
    assert report.applied == report.attempted == len(lora.layout)
    merged = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, hooked)
    pissa = randomized(ml.ModulatedPiSSA(model, r=2, targets=["experts"]), std=0.5)
    pissa.save(tmp_path / "p.safetensors")
    ml.merge_checkpoint(tmp_path / "base", tmp_path / "p.safetensors", tmp_path / "p_out")
    torch.manual_seed(1)
    tf.GraniteMoeForCausalLM(config).save_pretrained(tmp_path / "other")
    with pytest.raises(ml.CheckpointError, match=r"different base.*experts\.gate_up_proj"):
        ml.merge_checkpoint(tmp_path / "other", tmp_path / "p.safetensors", tmp_path / "p_out2")


def _phimoe():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.PhimoeConfig(**{**tiny.MOE, "vocab_size": tiny.VOCAB}, num_local_experts=4)
    return tf.PhimoeForCausalLM(config).eval()


def test_a_router_that_is_a_linear_subclass_is_left_alone():
    """PhiMoE's router (``mlp.router``) subclasses nn.Linear but returns ``(logits, weights,
    experts)``: "all-linear" leaves it alone like every other router (the experts are adapted
    and the hooked model runs), and naming it explicitly raises at construction, naming it."""
    from tests.helpers import hand_merged, logits

    model, x = _phimoe(), tiny.tokens()
    lora = randomized(ml.ModulatedLoRA(model, r=2, init="signed"))
    assert not [n for n in lora.layout.names if n.endswith("router")]
    assert any(t.experts for t in lora.layout)
    torch.testing.assert_close(
        logits(model, x, lora, c=0.7), logits(hand_merged(model, [(lora, 0.7)]), x)
    )
    with pytest.raises(ValueError, match=r"mlp\.router.*PhimoeTopKRouter.*tuple"):
        ml.ModulatedLoRA(model, r=2, targets=["router"])
    assert not ml.find_adapters(model)


def test_export_peft_warns_when_peft_would_reinterpret_the_targets(tmp_path):
    """For some MoE model types (GLM-4-MoE, DeepSeek, …) PEFT reads ``…gate_proj`` / ``up_proj``
    / ``down_proj`` in ``target_modules`` as transformers-v4 expert names and moves them onto
    the fused experts, so the dense MLP's adapter is dropped and real PEFT does not reproduce
    the hooked model. export_peft says so, naming the targets; a Mixtral export stays silent."""
    import transformers as tf
    from loguru import logger

    messages = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        arch = dict(n_routed_experts=4, moe_intermediate_size=48, first_k_dense_replace=1)
        config = tf.Glm4MoeConfig(**{**tiny.MOE, "vocab_size": tiny.VOCAB}, **arch, head_dim=8)
        torch.manual_seed(0)
        glm = tf.Glm4MoeForCausalLM(config).eval()
        ml.export_peft(ml.ModulatedLoRA(glm, r=2), tmp_path / "glm")
        assert any("model.layers.0.mlp.gate_proj" in m and "PEFT" in m for m in messages)
        messages.clear()
        ml.export_peft(ml.ModulatedLoRA(tiny.mixtral(), r=2), tmp_path / "mixtral")
        assert not messages
    finally:
        logger.remove(sink)
    assert (tmp_path / "glm" / "adapter_config.json").is_file()
