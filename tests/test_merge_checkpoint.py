"""Offline merge of a saved model folder (modlora/merge_checkpoint.py)."""

import hashlib
import importlib
import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modlora as ml
from modlora.merge_checkpoint import read_factors
from tests import legacy_format, tiny
from tests.checkpoint_files import claiming_rank, sealed
from tests.helpers import logits, signed_pissa, two_round_history

mc_mod = importlib.import_module("modlora.merge_checkpoint")  # the name is also the function
TOKENIZER_FILES = {"tokenizer.json": '{"fake": true}', "tokenizer_config.json": '{"x": 1}'}


KINDS = {"lora": tiny.signed_lora, "pissa": signed_pissa, "history": two_round_history}


def _save_base(model, folder, shard=True):
    model.generation_config.max_new_tokens = 11
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.3
    model.save_pretrained(str(folder), max_shard_size="20KB" if shard else "1GB")
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)
    return folder


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    ("arch", "kind"), [("llama", "lora"), ("llama", "pissa"), ("gpt2", "lora"), ("gpt2", "history")]
)
def test_sharded_merge_reloads_to_the_hooked_logits(arch, kind, tmp_path):
    model = tiny.BUILDERS[arch]()
    x = tiny.tokens()
    base = _save_base(model, tmp_path / "base")
    assert (base / "model.safetensors.index.json").is_file()  # really sharded
    adapter = KINDS[kind](model)
    adapter.save(tmp_path / "adapter.safetensors")
    with adapter(model, c=1.5):
        hooked = logits(model, x)
    before = _digest(base)

    report = ml.merge_checkpoint(base, tmp_path / "adapter.safetensors", tmp_path / "out", c=1.5)

    out = tmp_path / "out"
    merged = tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(merged, x), hooked)
    assert report.attempted == report.applied == len(adapter.layout)
    assert set(report.targets) == set(adapter.layout.names) and report.worst_rel_error < 1e-4
    assert _digest(base) == before  # the base folder is never modified
    gen = tf.GenerationConfig.from_pretrained(str(out))
    assert (gen.max_new_tokens, gen.do_sample, gen.temperature) == (11, True, 0.3)
    for name in ["config.json", "generation_config.json", *TOKENIZER_FILES]:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    record = json.loads((out / "modlora_merge.json").read_text())
    assert (record["kind"], record["c"], record["applied"]) == (kind, 1.5, len(adapter.layout))
    assert record["adapter"].endswith("adapter.safetensors")
    assert set(record["weights"]) == set(adapter.layout.names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            assert json.loads(f.metadata()["modlora_merge"])["c"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "base", "out"]


def test_single_file_deployed_c_and_a_missing_model_prefix(tmp_path):
    model = tiny.llama()
    x = tiny.tokens()
    base = _save_base(model, tmp_path / "base", shard=False)
    assert (base / "model.safetensors").is_file()
    lora = tiny.signed_lora(
        model.model
    )  # built on the inner LlamaModel: names "layers.N..." (no "model.")
    lora.save(tmp_path / "a.safetensors", c=-0.75)
    with lora(model.model, c=-0.75):
        hooked = logits(model, x)
    report = ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path / "out", c=None)
    assert report.c == -0.75
    merged = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(logits(merged, x), hooked)
    weights = json.loads((tmp_path / "out" / "modlora_merge.json").read_text())["weights"]
    assert weights["layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"


def test_legacy_lora_file_merges(tmp_path):
    model = tiny.gpt2()
    x = tiny.tokens()
    base = _save_base(model, tmp_path / "base")
    lora = tiny.signed_lora(model)
    factors = {n: (t["lora_A"], t["lora_B"]) for n, t in lora.target_tensors().items()}
    legacy_format.save_legacy_lora(tmp_path / "old.safetensors", factors, 4, 8, ["all-linear"])
    with lora(model, c=1.0):
        hooked = logits(model, x)
    ml.merge_checkpoint(base, tmp_path / "old.safetensors", tmp_path / "out")
    merged = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(logits(merged, x), hooked)


@pytest.mark.parametrize("kind", ["lora", "pissa", "history"])
def test_read_factors_equals_the_live_delta_factors(kind, llama, tmp_path):
    adapter = KINDS[kind](llama)
    adapter.save(tmp_path / "a.safetensors")
    read = read_factors(tmp_path / "a.safetensors", c=-2.0)
    live = adapter.delta_factors(-2.0)
    assert read.kind == kind and read.factors.keys() == live.keys()
    for name, (a, b) in live.items():
        assert torch.equal(read.factors[name][0], a) and torch.equal(read.factors[name][1], b)


def _nothing_written(tmp_path, *keep):
    return sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_mismatched_adapter_writes_nothing(tmp_path):
    base = _save_base(tiny.llama(), tmp_path / "base")
    wide = tiny.llama(hidden_size=48)
    tiny.signed_lora(wide).save(tmp_path / "wide.safetensors")
    with pytest.raises(
        ml.MergeError,
        match=r"q_proj': shape mismatch.*is \(32, 32\).*needs \(48, 48\).*27 more.*nothing written",
    ):
        ml.merge_checkpoint(base, tmp_path / "wide.safetensors", tmp_path / "out")
    tiny.signed_lora(tiny.gpt2()).save(tmp_path / "gpt2.safetensors")
    with pytest.raises(ml.MergeError, match=r"transformer.h.0.attn.c_attn.*no module.*15 more"):
        ml.merge_checkpoint(base, tmp_path / "gpt2.safetensors", tmp_path / "out")
    assert _nothing_written(tmp_path, "base", "wide.safetensors", "gpt2.safetensors")


def test_another_base_raises_for_pissa_and_on_request(tmp_path):
    base = _save_base(tiny.llama(seed=1), tmp_path / "base")
    signed_pissa(tiny.llama()).save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="different base"):
        ml.merge_checkpoint(base, tmp_path / "p.safetensors", tmp_path / "out")
    tiny.signed_lora(tiny.llama()).save(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="different base"):
        ml.merge_checkpoint(base, tmp_path / "l.safetensors", tmp_path / "out", check_base="raise")
    with pytest.raises(ValueError, match="check_base"):
        ml.merge_checkpoint(base, tmp_path / "l.safetensors", tmp_path / "out", check_base="nope")
    assert _nothing_written(tmp_path, "base", "p.safetensors", "l.safetensors")
    ml.merge_checkpoint(base, tmp_path / "l.safetensors", tmp_path / "out")  # LoRA: warns only
    assert (tmp_path / "out" / "modlora_merge.json").is_file()


def test_existing_out_dir_is_refused_unless_overwrite(tmp_path):
    model = tiny.gpt2()
    base = _save_base(model, tmp_path / "base")
    tiny.signed_lora(model).save(tmp_path / "a.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(ValueError, match="overlaps the input"):
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", base, overwrite=True)
    with pytest.raises(FileExistsError, match="not written by modlora"):  # the user's folder
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()  # an empty folder holds nothing to lose
    ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, overwrite=True)
    ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, overwrite=True)  # its own output
    assert (out / "modlora_merge.json").is_file()


def test_failure_on_the_last_shard_leaves_no_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    model = tiny.llama()
    base = _save_base(model, tmp_path / "base")
    lora = tiny.signed_lora(model)
    lora.save(tmp_path / "a.safetensors")
    out = tmp_path / "out"
    ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, c=0.5)
    old = _digest(out)
    real, seen = mc_mod._merge_one, []

    def failing(plan, *args):
        seen.append(plan.name)
        if len(seen) == len(lora.layout):
            raise ml.MergeError(plan.name, "forced")
        return real(plan, *args)

    monkeypatch.setattr(mc_mod, "_merge_one", failing)
    with pytest.raises(ml.MergeError, match="forced"):
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, overwrite=True)
    assert _digest(out) == old
    assert _nothing_written(tmp_path, "base", "a.safetensors", "out")


@pytest.mark.parametrize(
    ("build", "lora_kw", "match"),
    [
        (lambda: tiny.llama().half(), {"std": 1e6}, "not finite in torch.float16"),  # ΔW > fp16
        (
            tiny.gpt2,
            {"targets": ["lm_head"], "exclude": ()},
            "lm_head.*tied to the input embedding",
        ),
    ],
    ids=["non_finite_in_fp16", "tied_lm_head"],
)
def test_a_merge_that_cannot_be_written_writes_nothing(build, lora_kw, match, tmp_path):
    model = build()
    base = _save_base(model, tmp_path / "base")
    tiny.signed_lora(model, **lora_kw).save(tmp_path / "a.safetensors")
    with pytest.raises(ml.MergeError, match=match):
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path / "out")
    assert _nothing_written(tmp_path, "base", "a.safetensors")


def test_square_weights_need_the_model_class(tmp_path):
    model = tiny.gpt2()
    base = _save_base(model, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["NoSuchModel"]
    (base / "config.json").write_text(json.dumps(config))
    tiny.signed_lora(model).save(tmp_path / "a.safetensors")
    with pytest.raises(ml.MergeError, match="orientation of square weight"):
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path / "out")
    assert _nothing_written(tmp_path, "base", "a.safetensors")


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    tiny.signed_lora(tiny.llama()).save(tmp_path / "a.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ml.merge_checkpoint(tmp_path / "base", tmp_path / "a.safetensors", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ml.merge_checkpoint(tmp_path / "nope", tmp_path / "a.safetensors", tmp_path / "out")
    assert _nothing_written(tmp_path, "base", "a.safetensors")


def test_bad_adapter_files_are_refused(llama, tmp_path):
    lora = tiny.signed_lora(llama)
    lora.save(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "a.safetensors"))
    weird = {**tensors, "x.weird": torch.zeros(2)}
    save_file(weird, str(tmp_path / "b.safetensors"), sealed(meta, weird))
    with pytest.raises(ValueError, match=r"unexpected tensor keys \['x.weird'\]"):
        read_factors(tmp_path / "b.safetensors")
    first = lora.layout.names[0]
    del tensors[f"{first}.lora_B"]
    save_file(tensors, str(tmp_path / "c.safetensors"), sealed(meta, tensors))
    with pytest.raises(ValueError, match=rf"incomplete targets.*{first}: missing \['lora_B'\]"):
        read_factors(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="deployed c"):
        read_factors(tmp_path / "a.safetensors", c=None)


def test_adapter_metadata_must_fit_the_tensors(llama, tmp_path):
    lora = tiny.signed_lora(llama)
    lora.save(tmp_path / "a.safetensors")
    first = lora.layout.names[0]
    claiming_rank(tmp_path / "a.safetensors", tmp_path / "b.safetensors", first, 3)  # tensors: 4
    with pytest.raises(ValueError, match=rf"{first}.*lora_A \(4, 32\).*metadata says r=3"):
        read_factors(tmp_path / "b.safetensors")
    legacy = {"A.x": torch.zeros(2, 4), "B.x": torch.zeros(4, 2)}
    save_file(legacy, str(tmp_path / "old.safetensors"), {"r": "2"})
    with pytest.raises(ValueError, match="metadata key 'alpha' is missing"):
        read_factors(tmp_path / "old.safetensors")
