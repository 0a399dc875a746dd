"""Issue 13, one test per numbered item: each reproducer failed (or did harm) before the fix."""

import copy
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import modlora as ml
from modlora.applied import merged_deltas
from modlora.checkpoint import CheckpointError
from modlora.checkpoint.folder import MANIFEST
from modlora.checkpoint.write import clean_stale, temp_path
from modlora.training_state import STATE_FILE, resume_training, save_training_state
from tests import tiny
from tests.checkpoint_files import rewrite
from tests.helpers import (
    assert_same_state,
    logits,
    model_state,
    same_weights,
    signed_pissa,
    weights,
)

X = tiny.tokens()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _base_folder(model, folder):
    model.save_pretrained(str(folder), max_shard_size="20KB")
    return folder


# ---------------------------------------------------------------------------- 1
def test_1_overwrite_never_deletes_what_modlora_did_not_write(tmp_path, monkeypatch):
    model = tiny.llama()
    parent = tmp_path / "models"
    base = _base_folder(model, parent / "base")
    (parent / "sibling.txt").write_text("keep me")
    lora = tiny.signed_lora(model)
    lora.save(tmp_path / "a.safetensors")
    everything = _tree(tmp_path)

    for out in (parent, base / "merged", base):  # the parent of base, inside base, base itself
        with pytest.raises(ValueError, match="overlaps the input"):
            ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, overwrite=True)
    with pytest.raises(ValueError, match="overlaps the input"):  # the adapter file's folder
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path, overwrite=True)
    monkeypatch.chdir(parent)
    with pytest.raises(ValueError, match="current working directory"):
        ml.export_peft(lora, ".", overwrite=True)
    with pytest.raises(ValueError, match="current working directory"):
        ml.export_peft(lora, "..", overwrite=True)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by modlora"):
        ml.export_peft(lora, user, overwrite=True)
    assert _tree(tmp_path) == {**everything, "user/notes.md": b"mine"}

    out = tmp_path / "peft"
    ml.export_peft(lora, out)
    (out / "added_later.txt").write_text("also mine")  # the user adds a file to an output
    with pytest.raises(FileExistsError, match=r"files modlora did not write.*added_later"):
        ml.export_peft(lora, out, overwrite=True)
    assert (out / "added_later.txt").read_text() == "also mine"


# ---------------------------------------------------------------------------- 2
def test_2_a_merged_delta_is_never_applied_again(llama, tmp_path):
    base = logits(llama)
    lora = tiny.signed_lora(llama)
    ml.merge(llama, lora, c=1.0)
    merged = logits(llama)
    lora.save(tmp_path / "a.safetensors")
    twin = ml.load_adapter(llama, tmp_path / "a.safetensors")
    before = model_state(llama)
    with pytest.raises(ml.AdapterStateError, match="already merged.*apply twice"), twin(llama):
        pass
    with pytest.raises(ml.AdapterStateError, match="already merged"):
        ml.merge(llama, twin)
    with pytest.raises(ml.AdapterStateError, match="already merged"):
        ml.HistoryBake(llama, [(twin, 1.0)])
    assert_same_state(llama, before)
    assert torch.equal(logits(llama), merged)

    clone = copy.deepcopy(llama)  # the record travels with the weights it describes
    twin2 = ml.load_adapter(clone, tmp_path / "a.safetensors")
    with pytest.raises(ml.AdapterStateError, match="already merged"), twin2(clone):
        pass
    (entry,) = merged_deltas(clone)
    ml.unmerge(clone, entry.adapter)
    assert torch.equal(logits(clone), base)
    with twin2(clone, c=1.0):
        torch.testing.assert_close(logits(clone), merged)

    ml.unmerge(llama, lora)
    with twin(llama, c=1.0):  # once unmerged, the copy attaches
        torch.testing.assert_close(logits(llama), merged)


# ---------------------------------------------------------------------------- 3


def test_3_resume_checks_optimizer_class_base_and_extra_and_keeps_the_old_state(tmp_path):
    model = tiny.llama()
    lora = tiny.signed_lora(model)
    sgd = torch.optim.SGD(lora.parameters(), lr=0.1, momentum=0.9)
    lora.train()
    with lora(model, c=1.0):
        model(X).logits.sum().backward()
    sgd.step()
    folder = save_training_state(tmp_path / "state", lora, sgd, step=1, extra={"best": 1.0})
    good = _tree(folder)

    fresh = tiny.signed_lora(tiny.llama())
    adamw = torch.optim.AdamW(fresh.parameters())
    before = weights(fresh)
    with pytest.raises(ValueError, match="optimizer is a torch.optim.sgd.SGD"):
        resume_training(folder, fresh, adamw)
    assert same_weights(fresh, before)
    sgd2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert resume_training(folder, fresh, sgd2).step == 1
    sgd2.step()  # the restored momentum buffers work

    with pytest.raises(TypeError, match="would not load back"):  # not weights_only-safe
        save_training_state(folder, lora, sgd, step=2, extra={"when": object()})
    with pytest.raises(TypeError, match="would not load back"):
        save_training_state(tmp_path / "new", lora, sgd, step=2, extra={"run": Path("runs/1")})
    assert _tree(folder) == good and not (tmp_path / "new").exists()

    pissa = signed_pissa(model, r=2, targets=("q_proj",))
    opt = torch.optim.AdamW(pissa.parameters())
    pfolder = save_training_state(tmp_path / "pissa", pissa, opt)
    other = tiny.llama(seed=1)  # another base: its U, S, Vh would be the wrong SVD
    other_pissa = ml.ModulatedPiSSA(other, r=2, targets=("q_proj",))
    with pytest.raises(CheckpointError, match="different base model"):
        resume_training(pfolder, other_pissa, torch.optim.AdamW(other_pissa.parameters()))


def test_3_a_failed_save_keeps_the_previous_state(tmp_path, monkeypatch):
    model = tiny.llama()
    lora = tiny.signed_lora(model)
    opt = torch.optim.AdamW(lora.parameters())
    folder = save_training_state(tmp_path / "state", lora, opt, step=1)
    good = _tree(folder)
    with torch.no_grad():
        next(lora.parameters()).add_(1.0)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)  # the state file fails after the adapter file
    with pytest.raises(OSError, match="disk full"):
        save_training_state(folder, lora, opt, step=2)
    monkeypatch.undo()
    assert _tree(folder) == good
    assert sorted(os.listdir(tmp_path)) == ["state"]  # no temporary folder left
    fresh = tiny.signed_lora(tiny.llama())
    assert resume_training(folder, fresh, torch.optim.AdamW(fresh.parameters())).step == 1


# ---------------------------------------------------------------------------- 4
def test_4_a_failed_import_peft_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    model = tiny.llama()
    lora = tiny.signed_lora(model)
    ml.export_peft(lora, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))
    fresh = tiny.llama()
    fresh.requires_grad_(True)
    before = model_state(fresh)
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN/inf\)"):
        ml.import_peft(fresh, tmp_path / "peft")
    assert_same_state(fresh, before)

    ml.export_peft(lora, tmp_path / "peft", overwrite=True)

    def boom(self, tensors):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ml.ModulatedLoRA, "load_target_tensors", boom)
    with pytest.raises(RuntimeError, match="out of memory"):  # after the adapter was built
        ml.import_peft(fresh, tmp_path / "peft")
    assert_same_state(fresh, before)
    assert sum(p.requires_grad for p in fresh.parameters()) == len(list(fresh.parameters()))


# ---------------------------------------------------------------------------- 5
@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"alpha": "-8.0"}, "metadata 'alpha' is malformed"),
        ({"dtype": "float16"}, "tensors are not torch.float16 as the metadata says"),
    ],
)
def test_5_merge_checkpoint_refuses_what_load_adapter_refuses(meta, match, tmp_path):
    model = tiny.llama()
    base = _base_folder(model, tmp_path / "base")
    tiny.signed_lora(model).save(tmp_path / "a.safetensors")
    bad = rewrite(tmp_path / "a.safetensors", tmp_path / "bad.safetensors", meta=meta)
    with pytest.raises(CheckpointError, match=match):
        ml.load_adapter(model, bad)
    with pytest.raises(CheckpointError, match=match):
        ml.merge_checkpoint(base, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_5_legacy_files_with_a_negative_alpha_are_refused_by_every_reader(tmp_path):
    from tests.legacy_format import lora_factors, save_legacy_lora

    model = tiny.llama()
    base = _base_folder(model, tmp_path / "base")
    path = tmp_path / "seed.safetensors"
    lora = tiny.signed_lora(model, r=2, targets=("q_proj",))
    save_legacy_lora(path, lora_factors(lora), r=2, alpha=-4.0, targets=("q_proj",))
    for read in (
        lambda: ml.load_adapter(model, path),
        lambda: ml.merge_checkpoint(base, path, tmp_path / "out"),
    ):
        with pytest.raises(CheckpointError, match="alpha"):
            read()


# ---------------------------------------------------------------------------- 6
def test_6_a_pissa_saved_after_a_merge_names_its_own_base(tmp_path):
    model = tiny.llama()
    pissa = signed_pissa(model, r=2, targets=("q_proj",))
    pissa.save(tmp_path / "before.safetensors")
    ml.merge(model, tiny.signed_lora(model), c=1.0)
    pissa.save(tmp_path / "after.safetensors")
    before = ml.read_metadata(tmp_path / "before.safetensors")
    after = ml.read_metadata(tmp_path / "after.safetensors")
    assert after["fingerprints"] == before["fingerprints"]
    assert after["integrity"]["base"] == before["integrity"]["base"]
    own_base = tiny.llama()  # the same seed: the unmerged base
    loaded = ml.load_adapter(own_base, tmp_path / "after.safetensors")  # PiSSA: raise policy
    with loaded(own_base, c=1.0), pissa(model, c=0.0):
        assert torch.isfinite(logits(own_base)).all()
    ml.load_adapter(model, tmp_path / "after.safetensors")  # and on the merged model itself


# ---------------------------------------------------------------------------- 7
def test_7_an_interrupted_folder_swap_keeps_the_old_output(tmp_path, monkeypatch):
    from modlora.checkpoint import folder as folder_mod

    model = tiny.llama()
    base = _base_folder(model, tmp_path / "base")
    tiny.signed_lora(model).save(tmp_path / "a.safetensors")
    out = tmp_path / "out"
    ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, c=0.5)
    old = _tree(out)

    def interrupted(a, b):
        raise KeyboardInterrupt  # the moment between "old out" and "new out"

    monkeypatch.setattr(folder_mod, "exchange", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, c=1.0, overwrite=True)
    assert _tree(out) == old
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "base", "out"]

    monkeypatch.setattr(folder_mod, "exchange", lambda a, b: False)  # no renameat2: two renames
    ml.merge_checkpoint(base, tmp_path / "a.safetensors", out, c=1.0, overwrite=True)
    assert _tree(out) != old and sorted(os.listdir(tmp_path)) == ["a.safetensors", "base", "out"]


def test_7_stale_temporary_files_of_dead_writers_are_cleaned(tmp_path):
    target = tmp_path / "a.safetensors"
    stale = temp_path(target)
    dead = stale.with_name(stale.name.replace(f"-{os.getpid()}-", "-999999999-"))
    dead.write_bytes(b"half a file")
    (tmp_path / "folder").mkdir()
    dead_dir = temp_path(tmp_path / "folder")
    dead_dir = dead_dir.with_name(dead_dir.name.replace(f"-{os.getpid()}-", "-999999998-"))
    dead_dir.mkdir()
    mine = temp_path(target)  # a live writer (this process): kept
    mine.write_bytes(b"in progress")
    other = tmp_path / ".b.safetensors.modlora-00000000-999999999-00000000.tmp"
    other.write_bytes(b"another destination's")  # not ours to clean
    tiny.signed_lora(tiny.llama()).save(target)
    assert not dead.exists() and mine.exists() and other.exists()
    assert clean_stale(tmp_path / "folder") == [dead_dir]


# ---------------------------------------------------------------------------- 8
def _header_edit(path, dst, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets="x"),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=[7]),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=[9, 2]),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=[-4, 8]),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(shape="ab"),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype="F128"),
        lambda h: h.update(__metadata__={"kind": 3}),
    ],
)
def test_8_malformed_headers_raise_a_checkpoint_error_naming_the_file(edit, llama, tmp_path):
    tiny.signed_lora(llama).save(tmp_path / "a.safetensors")
    bad = _header_edit(tmp_path / "a.safetensors", tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match="bad.safetensors: not a safetensors file"):
        ml.load_adapter(llama, bad)


def test_8_named_errors_for_every_broken_input(tmp_path):
    model = tiny.llama()
    lora = tiny.signed_lora(model)
    lora.save(tmp_path / "a.safetensors")
    f8 = {
        k: v.to(torch.float8_e4m3fn) if k.endswith("lora_A") else v
        for k, v in load_file(str(tmp_path / "a.safetensors")).items()
    }
    rewrite(tmp_path / "a.safetensors", tmp_path / "f8.safetensors", tensors=f8)
    with pytest.raises(CheckpointError, match="f8.safetensors: tensors are not torch.float32"):
        ml.load_adapter(model, tmp_path / "f8.safetensors")

    base = _base_folder(model, tmp_path / "base")
    index = base / "model.safetensors.index.json"
    good = index.read_text()
    for text, match in (("{not json", "not JSON"), ('{"metadata": {}}', "weight_map")):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=rf"index.json: not a shard index.*{match}"):
            ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path / "out")
    index.write_text(good)
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    ml.export_peft(lora, tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").write_text("{'r': 4")
    with pytest.raises(CheckpointError, match="adapter_config.json: not a PEFT adapter config"):
        ml.import_peft(model, tmp_path / "peft")

    opt = torch.optim.AdamW(lora.parameters())
    folder = save_training_state(tmp_path / "state", lora, opt)
    state = torch.load(folder / STATE_FILE, weights_only=True)
    state["version"] = "1"
    torch.save(state, folder / STATE_FILE)
    with pytest.raises(CheckpointError, match="entry 'version' is malformed"):
        resume_training(folder, lora, opt)


# Under the test suite's run-time type checks (beartype) a complex or bool c is refused by the
# signature's type hint (a TypeError naming parameter c); without them, by validate_coeff.
NAMES_C = r"(coefficient c|parameter 'c'|parameter c=)"


@pytest.mark.parametrize(
    ("c", "error", "match"),
    [
        (10**400, ValueError, "coefficient c must be finite"),
        (1 + 2j, TypeError, NAMES_C),
        (torch.tensor(1 + 2j), TypeError, NAMES_C),
        (torch.tensor(1.0, device="meta"), ValueError, "coefficient c is a tensor on the meta"),
        (torch.tensor(True), TypeError, NAMES_C),
        ("1.0", TypeError, NAMES_C),
    ],
)
def test_8_nonsense_coefficients_are_named(c, error, match, llama, tmp_path):
    lora = tiny.signed_lora(llama)
    before = model_state(llama)
    for use in (
        lambda: lora(llama, c=c),
        lambda: lora.set_coeff(c),
        lambda: ml.merge(llama, lora, c=c),
        lambda: lora.save(tmp_path / "a.safetensors", c=c),
        lambda: ml.export_peft(lora, tmp_path / "peft", c=c),
    ):
        with pytest.raises(error, match=match):
            use()
    assert_same_state(llama, before)
    assert os.listdir(tmp_path) == []


def test_8_targets_none_is_named(llama, tmp_path):
    with pytest.raises(TypeError, match="targets"):  # the type hint, or find_targets
        ml.ModulatedLoRA(llama, targets=None)
    tiny.signed_lora(llama).save(tmp_path / "a.safetensors")
    bad = rewrite(tmp_path / "a.safetensors", tmp_path / "b.safetensors", meta={"targets": "null"})
    with pytest.raises(CheckpointError, match="metadata 'targets' is malformed"):
        ml.load_adapter(llama, bad)


# ---------------------------------------------------------------------------- 9
def test_9_integrity_gaps_are_caught(llama, tmp_path):
    pissa = signed_pissa(llama, r=2, targets=("q_proj",))
    pissa.save(tmp_path / "p.safetensors")
    tensors = load_file(str(tmp_path / "p.safetensors"))
    key = next(k for k in tensors if k.endswith(".U"))
    reversed_u = {key: tensors[key].flip(1).contiguous()}  # one target's U columns reversed
    bad = rewrite(tmp_path / "p.safetensors", tmp_path / "u.safetensors", tensors=reversed_u)
    with pytest.raises(CheckpointError, match=r"U, S, Vh are not its SVD"):
        ml.load_adapter(llama, bad)
    # a file of format v1 from before `integrity`: the same check holds
    old = rewrite(bad, tmp_path / "old.safetensors", drop=["integrity"])
    with pytest.raises(CheckpointError, match=r"U, S, Vh are not its SVD"):
        ml.load_adapter(llama, old)

    data = bytearray((tmp_path / "p.safetensors").read_bytes())
    data[-3] ^= 0x10  # one bit of tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flip.safetensors: the tensor bytes do not match"):
        ml.load_adapter(llama, tmp_path / "flip.safetensors")
    edited = rewrite(
        tmp_path / "p.safetensors", tmp_path / "e.safetensors", meta={"c": "3.0"}, reseal=False
    )
    with pytest.raises(CheckpointError, match="e.safetensors: the metadata does not match"):
        ml.read_metadata(edited)

    with pytest.raises(ValueError, match="delta_s_init must be finite"):
        ml.ModulatedPiSSA(llama, r=2, delta_s_init=float("nan"))


# ---------------------------------------------------------------------------- 10
def test_10_a_symlinked_checkpoint_stays_a_link(llama, tmp_path):
    real = tmp_path / "runs" / "a.safetensors"
    real.parent.mkdir()
    lora = tiny.signed_lora(llama)
    lora.save(real, c=1.0)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(real)
    lora.save(link, c=2.0)
    assert link.is_symlink() and ml.read_metadata(real)["c"] == 2.0
    assert sorted(os.listdir(real.parent)) == ["a.safetensors"]


def test_10_layer_range_selects_both_stacks_of_t5():
    cfg = tf.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4)
    t5 = tf.T5ForConditionalGeneration(cfg)
    names = ml.find_targets(t5, targets=(r"SelfAttention\.q",), layer_range=(0.5, 1.0)).names
    assert names == [
        f"{stack}.block.{i}.layer.0.SelfAttention.q"
        for stack in ("encoder", "decoder")
        for i in (2, 3)
    ]


def test_10_extra_meta_comes_back_as_given_or_is_refused(llama, tmp_path):
    lora = tiny.signed_lora(llama)
    for extra, match in (
        ({"pair": (1, 2)}, r"extra_meta\['pair'\] is a tuple.*use a list"),
        ({"by_step": {3: "x"}}, r"extra_meta\['by_step'\] has the key 3 \(int\)"),
        ({"when": object()}, r"extra_meta\['when'\] is a object"),
        ({"x": [float("nan")]}, r"extra_meta\['x'\]\[0\] must be finite"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            lora.save(tmp_path / "a.safetensors", extra_meta=extra)
    assert os.listdir(tmp_path) == []
    given = {"lr": np.float32(0.5), "step": np.int64(3), "loss": torch.tensor(1.25), "ok": [True]}
    lora.save(tmp_path / "a.safetensors", extra_meta=given)
    back = ml.load_adapter(llama, tmp_path / "a.safetensors").extra_meta
    assert back == {"lr": 0.5, "step": 3, "loss": 1.25, "ok": [True]}
    assert [type(v) for v in back.values()] == [float, int, float, list]


def test_10_natural_arguments_mean_what_they_say(llama, tmp_path):
    plain = ml.ModulatedLoRA(llama, r=4, alpha=8.0, layer_range=(1, 3))
    natural = ml.ModulatedLoRA(
        llama, r=np.int64(4), alpha=np.float32(8.0), layer_range=(np.int64(1), np.int64(3))
    )
    assert natural.layout.names == plain.layout.names and natural.alpha == 8.0
    natural.save(str(tmp_path / "a.safetensors"), c=np.float64(1.5))
    loaded = ml.load_adapter(llama, Path(tmp_path / "a.safetensors"))
    assert loaded.deployed_c == 1.5 and loaded.layout.names == plain.layout.names
    for c in (np.float32(1.5), torch.tensor(1.5), np.int64(2)):
        with natural(llama, c=c):
            assert natural.c == float(c) and type(natural.c) is float


# ---------------------------------------------------------------------------- 11
def test_11_the_cheap_base_fingerprint_sees_a_base_moved_by_1e_3(tmp_path):
    for shape in ((64, 32), (1024, 1000), (3, 5000, 7)):
        w = torch.randn(*shape)
        fp = ml.checkpoint.sample_fingerprint(w)
        assert ml.checkpoint.sample_fingerprint(w.clone()) == fp
        assert ml.checkpoint.sample_fingerprint(w * (1 + 1e-3)) != fp
        assert ml.checkpoint.sample_fingerprint(w.to(torch.bfloat16)) != fp
    model = tiny.llama()
    lora = tiny.signed_lora(model)
    lora.save(tmp_path / "a.safetensors")
    moved = tiny.llama()
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1 + 1e-3)
    with pytest.raises(CheckpointError, match="different base model"):
        ml.load_adapter(moved, tmp_path / "a.safetensors", check_base="raise")
    old = rewrite(tmp_path / "a.safetensors", tmp_path / "old.safetensors", drop=["integrity"])
    with pytest.raises(CheckpointError, match="different base model"):  # v1 fingerprints
        ml.load_adapter(moved, old, check_base="raise")
    ml.load_adapter(tiny.llama(), old, check_base="raise")


def test_safetensors_reader_is_not_fooled_by_an_unsealed_copy(tmp_path, llama):
    """The raw safetensors bytes of a file stay loadable by safetensors itself."""
    tiny.signed_lora(llama).save(tmp_path / "a.safetensors")
    assert safetensors.torch.load_file(str(tmp_path / "a.safetensors"))
    assert not (tmp_path / MANIFEST).exists()


def test_2_a_delta_in_an_attached_history_is_never_attached_again(llama, tmp_path):
    lora = tiny.signed_lora(llama)
    lora.attach(llama, c=1.0)
    before = model_state(llama)
    with pytest.raises(ml.AdapterStateError, match="round's delta is already attached"):
        ml.HistoryBake(llama, [(lora, 1.0)])
    assert_same_state(llama, before)
    lora.detach()
    hist = ml.HistoryBake(llama, [(lora, 0.5)])
    with pytest.raises(ml.AdapterStateError, match="HistoryBake holding this very delta"):
        lora.attach(llama, c=1.0)
    hist.save(tmp_path / "h.safetensors")
    lora.save(tmp_path / "a.safetensors")
    hist.remove()
    loaded = ml.load_adapter(llama, tmp_path / "h.safetensors")  # attached, knows its rounds
    twin = ml.load_adapter(llama, tmp_path / "a.safetensors")
    with pytest.raises(ml.AdapterStateError, match="HistoryBake holding this very delta"):
        twin.attach(llama, c=1.0)
    loaded.remove()
    with twin(llama, c=1.0):
        pass


def test_2_an_offline_merge_never_merges_a_delta_twice(tmp_path):
    model = tiny.llama()
    base = _base_folder(model, tmp_path / "base")
    lora = tiny.signed_lora(model)
    lora.save(tmp_path / "a.safetensors")
    ml.merge_checkpoint(base, tmp_path / "a.safetensors", tmp_path / "once")
    lora.save(tmp_path / "copy.safetensors", extra_meta={"renamed": True})  # same tensors
    with pytest.raises(ValueError, match="already holds this delta"):
        ml.merge_checkpoint(tmp_path / "once", tmp_path / "copy.safetensors", tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    other = tiny.signed_lora(model, seed=9)
    other.save(tmp_path / "b.safetensors")
    ml.merge_checkpoint(tmp_path / "once", tmp_path / "b.safetensors", tmp_path / "both")
    with pytest.raises(ValueError, match="already holds this delta"):  # found down the chain
        ml.merge_checkpoint(tmp_path / "both", tmp_path / "a.safetensors", tmp_path / "thrice")


def test_folder_outputs_get_ordinary_permissions(llama, tmp_path):
    """safetensors creates files 0600; an exported folder is readable like any file (umask)."""
    old = os.umask(0o022)
    try:
        ml.export_peft(tiny.signed_lora(llama), tmp_path / "peft")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "peft").iterdir()}
    assert set(modes.values()) == {0o644}, modes
