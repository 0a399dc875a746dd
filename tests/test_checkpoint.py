"""Checkpoints (modlora/checkpoint.py): round trips, bad files, legacy files, atomic writes."""

import json
import math
import os
import struct

import pytest
import safetensors.torch
import torch
from loguru import logger
from safetensors import safe_open

import modlora as ml
from modlora import checkpoint as ckpt
from modlora import digest as ckpt_digest
from modlora.checkpoint import CheckpointError, load_adapter, read_metadata, weight_fingerprint
from tests import tiny
from tests.checkpoint_files import rewrite, sealed
from tests.helpers import add_deltas, assert_same_state, hand_delta, logits, model_state
from tests.legacy_format import (
    flat,
    lora_factors,
    pissa_factors,
    save_legacy_lora,
    save_legacy_pissa,
)

UNICODE_META = {"round": 3, "note": "héllo ☃ 日本語 🚀", "nested": {"ok": [1, 2.5, None]}}
COEFFS = [1.0, -0.5, 2.75, torch.tensor([1.5, -2.0])]  # scalar and per-sample (batch = 2)


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def warnings_log():
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    yield messages
    logger.remove(handler)


def randomize(adapter, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return adapter


def outputs(model, adapter, x, coeffs=COEFFS):
    out = []
    for c in coeffs:
        with adapter(model, c=c):
            out.append(model(x).logits)
    return out


def assert_same_outputs(model, a, b, x):
    for c, ya, yb in zip(COEFFS, outputs(model, a, x), outputs(model, b, x), strict=True):
        assert torch.equal(ya, yb), f"outputs differ at c={c}"


def make_lora(model):
    lora = ml.ModulatedLoRA(
        model,
        r=3,
        alpha=5.0,
        targets=("q_proj", "v_proj", "down_proj"),
        exclude=("lm_head", r"layers\.1\.self_attn\.v_proj"),
        layer_range=(1, 4),
        dropout=0.25,
        init="signed",
        dtype=torch.float64,
        rank_pattern={"model.layers.2.mlp.down_proj": 5},
        alpha_pattern={"model.layers.3.self_attn.q_proj": 7.0},
    )
    return randomize(lora)


def make_pissa(model, r=20):
    pissa = ml.ModulatedPiSSA(
        model,
        r=r,  # > 16 = d_out of k/v_proj: clamped per layer
        targets=("k_proj", "o_proj", "up_proj"),
        layer_range=(0.25, 0.75),
        delta_s_init=0.1,
        dtype=torch.float64,
    )
    return randomize(pissa, seed=7)


@pytest.fixture
def lora_file(llama, tmp_path):
    path = tmp_path / "lora.safetensors"
    make_lora(llama).save(path, extra_meta=UNICODE_META, c=1.25)
    return path


@pytest.fixture
def pissa_file(llama, tmp_path):
    path = tmp_path / "pissa.safetensors"
    make_pissa(llama).save(path, extra_meta={"who": "ü"}, c=-0.5)
    return path


# ---------------------------------------------------------------------------- round trips
def test_lora_round_trip(llama, tmp_path):
    x = tiny.tokens()
    lora = make_lora(llama)
    path = tmp_path / "a.safetensors"
    lora.save(path, extra_meta=UNICODE_META, c=1.25)
    same = ml.ModulatedLoRA.from_checkpoint(llama, path)
    assert type(same) is ml.ModulatedLoRA
    assert same.training is False  # eval mode: dropout off
    assert (same.r, same.alpha, same.dropout_p, same.init, same.dtype) == (
        3,
        5.0,
        0.25,
        "signed",
        torch.float64,
    )
    assert same.rank_pattern == {"model.layers.2.mlp.down_proj": 5}
    assert same.alpha_pattern == {"model.layers.3.self_attn.q_proj": 7.0}
    assert same.ranks() == lora.ranks()
    assert same.layout.names == lora.layout.names
    assert (same.layout.patterns, same.layout.exclude, same.layout.layer_range) == (
        lora.layout.patterns,
        lora.layout.exclude,
        lora.layout.layer_range,
    )
    assert same.deployed_c == 1.25 and same.extra_meta == UNICODE_META
    sd, sd2 = lora.state_dict(), same.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) and sd2[k].dtype == torch.float64 for k in sd)
    assert_same_outputs(llama, lora, same, x)
    with same(llama, c=1.0):  # eval mode: two forwards agree (dropout inactive)
        assert torch.equal(llama(x).logits, llama(x).logits)
    lora.train()
    with lora(llama, c=1.0):  # the dropout is real: in training mode forwards differ
        assert not torch.equal(llama(x).logits, llama(x).logits)


def test_lora_round_trip_gpt2_conv1d_bf16(gpt2, tmp_path):
    x = tiny.tokens()
    lora = ml.ModulatedLoRA(
        gpt2, r=2, alpha=3.0, targets="all-linear", layer_range=(0.25, 0.75), dtype=torch.bfloat16
    )
    randomize(lora)
    path = tmp_path / "g.safetensors"
    lora.save(path)
    same = ml.load_adapter(gpt2, path)
    assert same.dtype == torch.bfloat16 and same.layout.layer_range == (0.25, 0.75)
    assert same.deployed_c is None and same.extra_meta == {}
    scalars = [1.0, -0.5, 2.75, torch.tensor([1.0, -1.0])]  # scalar and per-sample
    for ya, yb in zip(
        outputs(gpt2, lora, x, scalars), outputs(gpt2, same, x, scalars), strict=True
    ):
        assert torch.equal(ya, yb)


def test_pissa_round_trip_keeps_per_layer_ranks(llama, tmp_path):
    x = tiny.tokens()
    pissa = make_pissa(llama)
    ranks = pissa.ranks()
    assert set(ranks.values()) == {16, 20}  # k_proj (d_out 16) is clamped
    path = tmp_path / "p.safetensors"
    pissa.save(path, extra_meta=UNICODE_META, c=-0.5)
    same = ml.ModulatedPiSSA.from_checkpoint(llama, path)
    assert same.training is False and same.ranks() == ranks
    assert (same.r, same.selection_score, same.dtype, same.delta_s_init) == (
        20,
        "s_only",
        torch.float64,
        0.1,
    )
    assert same.deployed_c == -0.5 and same.extra_meta == UNICODE_META
    assert same.tail_depth == pissa.tail_depth
    assert all(torch.equal(same.selected[n], pissa.selected[n]) for n in ranks)
    sd, sd2 = pissa.state_dict(), same.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert_same_outputs(llama, pissa, same, x)
    meta = read_metadata(path)
    assert meta["shapes"]["model.layers.1.self_attn.k_proj"] == [32, 16, 16]
    assert meta["shapes"]["model.layers.1.self_attn.o_proj"] == [32, 32, 20]


def test_history_round_trip_mixed_kinds(llama, tmp_path):
    x = tiny.tokens()
    lora, pissa = make_lora(llama), make_pissa(llama)
    hist = ml.HistoryBake(llama, [(lora, 1.5), (pissa, -0.75)], attach=False)
    path = tmp_path / "h.safetensors"
    hist.save(path, extra_meta=UNICODE_META, c=1.0)
    same = ml.HistoryBake.from_checkpoint(llama, path, attach=False)
    assert not same.attached and same.training is False
    assert same.round_info == hist.round_info and same.ranks() == hist.ranks()
    assert same.deployed_c == 1.0 and same.extra_meta == UNICODE_META
    assert_same_outputs(llama, hist, same, x)
    attached = ml.load_adapter(llama, tmp_path / "h.safetensors")  # attached by default
    try:
        assert attached.attached
        y_loaded = llama(x).logits
    finally:
        attached.remove()
    with hist(llama, c=1.0):
        assert torch.equal(llama(x).logits, y_loaded)


def test_resave_keeps_c_and_extra_meta_and_legacy_resaves_as_v1(llama, lora_file, tmp_path):
    first = load_adapter(llama, lora_file)
    first.save(tmp_path / "again.safetensors")
    again = load_adapter(llama, tmp_path / "again.safetensors")
    assert again.deployed_c == 1.25 and again.extra_meta == UNICODE_META
    legacy = tmp_path / "legacy.safetensors"
    save_legacy_lora(legacy, lora_factors(first), 3, 5.0, ["q_proj"], None)
    # rank_pattern made one target r=5: the seed's single r cannot describe it
    with pytest.raises(
        CheckpointError, match=r"down_proj.*shapes give r=5 but the metadata says r=3"
    ):
        load_adapter(llama, legacy)


def test_load_does_not_move_the_rng(llama, lora_file):
    state = torch.get_rng_state()
    load_adapter(llama, lora_file)
    assert torch.equal(torch.get_rng_state(), state)


def test_read_metadata(lora_file):
    meta = read_metadata(lora_file)
    assert meta["format_version"] == ckpt.FORMAT_VERSION and meta["kind"] == "lora"
    assert meta["modlora_version"] == ml.__version__
    assert meta["r"] == 3 and meta["alpha"] == 5.0 and meta["dropout"] == 0.25
    assert meta["layer_range"] == [1, 4] and meta["dtype"] == "float64"
    assert meta["extra_meta"] == UNICODE_META and meta["c"] == 1.25
    assert meta["shapes"]["model.layers.2.mlp.down_proj"] == [64, 32, 5]
    assert len(meta["fingerprints"]) == len(meta["shapes"])
    with safe_open(str(lora_file), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.self_attn.q_proj.lora_A" in keys
    assert "model.layers.1.self_attn.q_proj.lora_B" in keys


# ---------------------------------------------------------------------------- bad files
def _expect_failure(model, path, match, exc=CheckpointError, **kw):
    snap = model_state(model)
    with pytest.raises(exc, match=match):
        load_adapter(model, path, **kw)
    assert_same_state(model, snap)


def test_truncated_file(llama, lora_file, tmp_path):
    data = lora_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    _expect_failure(llama, cut, "truncated")
    cut.write_bytes(data[:100])  # inside the header
    _expect_failure(llama, cut, "truncated")
    cut.write_bytes(data[:5])
    _expect_failure(llama, cut, "truncated")


def test_not_safetensors(llama, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not a checkpoint")
    _expect_failure(llama, text, "not a safetensors file")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    _expect_failure(llama, junk, "not a safetensors file")
    _expect_failure(llama, tmp_path / "absent.safetensors", "no checkpoint", FileNotFoundError)


def test_foreign_safetensors_file(llama, tmp_path):
    other = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"model.embed.weight": torch.zeros(2, 2)}, str(other))
    _expect_failure(llama, other, "not a modlora checkpoint")


@pytest.mark.parametrize("key", ["alpha", "r", "kind", "dtype", "shapes", "extra_meta", "targets"])
def test_missing_metadata_key(llama, lora_file, tmp_path, key):
    bad = rewrite(lora_file, tmp_path / "bad.safetensors", drop=[key])
    _expect_failure(llama, bad, f"metadata key '{key}' is missing")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("r", "three"),
        ("r", "-2"),
        ("alpha", "0"),
        ("dropout", "1.5"),
        ("init", '"gaussian"'),
        ("layer_range", "[1]"),
        ("dtype", "int32"),
        ("targets", '"q_proj"'),
        ("extra_meta", "[1, 2]"),
        ("shapes", '{"x": [1, 2]}'),
        ("c", '"big"'),
        ("format_version", "one"),
    ],
)
def test_malformed_metadata(llama, lora_file, tmp_path, key, value):
    bad = rewrite(lora_file, tmp_path / "bad.safetensors", meta={key: value})
    _expect_failure(llama, bad, f"metadata '{key}' is malformed")


def test_unknown_kind_and_newer_format(llama, lora_file, tmp_path):
    bad = rewrite(lora_file, tmp_path / "k.safetensors", meta={"kind": "dora"})
    _expect_failure(llama, bad, "unknown adapter kind 'dora'")
    newer = rewrite(lora_file, tmp_path / "v.safetensors", meta={"format_version": "2"})
    _expect_failure(llama, newer, "format version 2 is newer than this modlora supports")
    with pytest.raises(CheckpointError, match="format version 2 is newer"):
        read_metadata(newer)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors(llama, lora_file, tmp_path, value):
    key = "model.layers.2.self_attn.q_proj.lora_B"
    b = safetensors.torch.load_file(str(lora_file))[key]
    b[0, 0] = value
    bad = rewrite(lora_file, tmp_path / "nan.safetensors", tensors={key: b})
    _expect_failure(llama, bad, rf"non-finite values \(NaN/inf\) in \['{key}'\]")


def test_missing_role_and_stray_key(llama, lora_file, tmp_path):
    data = safetensors.torch.load_file(str(lora_file))
    with safe_open(str(lora_file), "pt") as f:
        meta = f.metadata()
    del data["model.layers.1.mlp.down_proj.lora_B"]
    bad = tmp_path / "role.safetensors"
    safetensors.torch.save_file(data, str(bad), metadata=sealed(meta, data))
    _expect_failure(llama, bad, r"incomplete targets.*down_proj: missing \['lora_B'\]")
    stray = rewrite(lora_file, tmp_path / "s.safetensors", tensors={"x.weight": torch.zeros(1)})
    _expect_failure(llama, stray, r"unexpected tensor keys \['x.weight'\]")


def test_rank_contradiction_names_target_and_shapes(llama, lora_file, tmp_path):
    name = "model.layers.1.self_attn.q_proj"
    bad = rewrite(lora_file, tmp_path / "r.safetensors", meta={"r": "4"})
    _expect_failure(llama, bad, rf"'{name}': lora_A \(3, 32\), lora_B \(32, 3\).*metadata says r=4")
    a = torch.zeros(2, 32, dtype=torch.float64)  # A with r=2, B still r=3
    bad = rewrite(lora_file, tmp_path / "ab.safetensors", tensors={f"{name}.lora_A": a})
    _expect_failure(llama, bad, rf"'{name}': lora_A \(2, 32\), lora_B \(32, 3\): rank mismatch")
    shapes = read_metadata(lora_file)["shapes"]
    shapes[name][2] = 6
    bad = rewrite(lora_file, tmp_path / "sh.safetensors", meta={"shapes": json.dumps(shapes)})
    _expect_failure(llama, bad, rf"'{name}'.*shapes give r=3 but the metadata says r=6")


def test_dtype_contradiction(llama, lora_file, tmp_path):
    bad = rewrite(lora_file, tmp_path / "d.safetensors", meta={"dtype": "float32"})
    _expect_failure(llama, bad, "tensors are not torch.float32 as the metadata says")


def test_wrong_model_lists_targets(lora_file, pissa_file):
    gpt2 = tiny.gpt2()
    _expect_failure(gpt2, lora_file, r"does not fit this model.*unexpected targets \['model\.")
    wider = tiny.llama(intermediate_size=48)
    _expect_failure(wider, lora_file, r"mismatched targets \['model.layers.1.mlp.down_proj: file")
    # same layer shapes, twice the depth: the stored band (0.25, 0.75) now selects blocks 2..5
    deeper = tiny.llama(num_hidden_layers=8)
    _expect_failure(
        deeper,
        pissa_file,
        r"missing targets \['model.layers.3.self_attn.k_proj'.*unexpected targets "
        r"\['model.layers.1.self_attn.k_proj \(not selected",
    )


def test_kind_mismatch_builds_nothing(llama, tmp_path):
    hist = ml.HistoryBake(llama, [(randomize(ml.ModulatedLoRA(llama, r=2)), 1.0)], attach=False)
    path = tmp_path / "h.safetensors"
    hist.save(path)
    snap = model_state(llama)
    with pytest.raises(TypeError, match="holds a HistoryBake, not a ModulatedLoRA"):
        ml.ModulatedLoRA.from_checkpoint(llama, path)
    assert_same_state(llama, snap)  # the history was neither built nor attached


def test_bad_options(llama, lora_file):
    _expect_failure(llama, lora_file, "attach/gate apply to history", ValueError, attach=True)
    _expect_failure(llama, lora_file, "check_base must be", ValueError, check_base="maybe")


def test_failure_while_building_restores_the_model(llama, lora_file, monkeypatch):
    def boom(self, tensors):
        raise RuntimeError("disk fell over")

    monkeypatch.setattr(ml.ModulatedLoRA, "load_target_tensors", boom)
    _expect_failure(llama, lora_file, "disk fell over", RuntimeError)


# ---------------------------------------------------------------------------- base fingerprints
def test_pissa_on_a_different_base_raises(pissa_file, warnings_log):
    other = tiny.llama(seed=1)
    _expect_failure(other, pissa_file, r"different base model: \d+ target weight")
    loaded = load_adapter(other, pissa_file, check_base="warn")
    assert isinstance(loaded, ml.ModulatedPiSSA)
    assert any("different base model" in m for m in warnings_log)


def test_lora_on_a_different_base_warns(lora_file, warnings_log):
    other = tiny.llama(seed=1)
    assert isinstance(load_adapter(other, lora_file), ml.ModulatedLoRA)
    assert any("different base model" in m for m in warnings_log)
    _expect_failure(tiny.llama(seed=1), lora_file, "different base model", check_base="raise")
    warnings_log.clear()
    load_adapter(tiny.llama(seed=1), lora_file, check_base="ignore")
    assert warnings_log == []


def test_fingerprint_is_sensitive():
    w = torch.randn(64, 32)
    fp = weight_fingerprint(w)
    assert fp == weight_fingerprint(w.clone())
    bumped = w.clone()
    bumped[10, 3] = torch.nextafter(bumped[10, 3], torch.tensor(math.inf))  # one ulp
    assert weight_fingerprint(bumped) != fp
    assert weight_fingerprint(w.to(torch.bfloat16)) != fp
    assert weight_fingerprint(w.T.contiguous().T) == fp  # same values, same shape
    assert weight_fingerprint(w.T) != fp  # transposed: a different weight
    big = torch.randn(2**22 + 7)  # sampled path
    fp_big = weight_fingerprint(big)
    big[12345] += 1e-3  # off the sampling stride: only the sums see it
    assert 12345 % ((2**22 + 7) // ckpt_digest.SAMPLE_SIZE) != 0
    assert weight_fingerprint(big) != fp_big


# ---------------------------------------------------------------------------- double application
def test_loading_a_pissa_file_twice(llama, pissa_file):
    x = tiny.tokens()
    first = load_adapter(llama, pissa_file)
    second = load_adapter(llama, pissa_file)  # neither attached: fine (non-destructive)
    first.attach(llama, c=1.0)
    y = llama(x).logits
    snap = model_state(llama)
    with pytest.raises(CheckpointError, match="loaded from the same checkpoint.*attached"):
        load_adapter(llama, pissa_file)
    assert_same_state(llama, snap)
    with pytest.raises(ml.AdapterStateError, match="already attached to this model"):
        second.attach(llama, c=1.0)
    with pytest.raises(ml.AdapterStateError, match="apply twice"), second(llama, c=1.0):
        pass
    assert_same_state(llama, snap)
    assert torch.equal(llama(x).logits, y)  # still exactly one copy applied
    first.detach()
    with second(llama, c=1.0):  # one at a time is fine
        assert torch.equal(llama(x).logits, y)


def test_loading_a_history_twice(llama, tmp_path):
    hist = ml.HistoryBake(llama, [(randomize(ml.ModulatedLoRA(llama, r=2)), 1.0)], attach=False)
    path = tmp_path / "h.safetensors"
    hist.save(path)
    loaded = load_adapter(llama, path)  # attached on load
    _expect_failure(llama, path, "loaded from the same checkpoint")
    loaded.remove()
    load_adapter(llama, path).remove()


def test_two_models_do_not_interfere(pissa_file):
    """The same file attached to two models: each gets its delta once, and each its own."""
    x = tiny.tokens()
    a, b = tiny.llama(), tiny.llama()  # the same base weights the file was made on
    base = logits(a, x)
    # Reference from the file's raw tensors, without modlora's loader: W + U diag(delta_s) Vh.
    stored = safetensors.torch.load_file(str(pissa_file))
    names = {key.rsplit(".", 1)[0] for key in stored}
    roles = ("U", "delta_s", "Vh")
    deltas = {n: hand_delta("pissa", {r: stored[f"{n}.{r}"] for r in roles}, 1.0) for n in names}
    reference = tiny.llama()
    add_deltas(reference, deltas)
    expected = logits(reference, x)
    assert not torch.allclose(expected, base)

    first = load_adapter(a, pissa_file)
    first.attach(a, c=1.0)
    second = load_adapter(b, pissa_file)  # another model: no conflict with a's copy
    second.attach(b, c=1.0)
    torch.testing.assert_close(logits(a, x), expected)
    torch.testing.assert_close(logits(b, x), expected)
    first.detach()
    assert torch.equal(logits(a, x), base)
    torch.testing.assert_close(logits(b, x), expected)  # b's adapter is its own
    second.detach()
    assert torch.equal(logits(b, x), base)
    assert not ml.find_adapters(a) and not ml.find_adapters(b)


# ---------------------------------------------------------------------------- legacy files
def test_legacy_lora_loads(llama, tmp_path):
    x = tiny.tokens()
    lora = randomize(
        ml.ModulatedLoRA(
            llama,
            r=4,
            alpha=8.0,
            targets=("q_proj", "v_proj"),
            exclude=("vision_tower", "lm_head"),
            layer_range=(1, 3),
        )
    )
    path = tmp_path / "seed_lora.safetensors"
    save_legacy_lora(
        path, lora_factors(lora), 4, 8.0, ["q_proj", "v_proj"], (1, 3), {"round": 2, "tag": "ü"}
    )
    with safe_open(str(path), "pt") as f:
        assert f"A.{flat('model.layers.1.self_attn.q_proj')}" in set(f.keys())
    assert read_metadata(path)["format_version"] == 0
    same = ml.ModulatedLoRA.from_checkpoint(llama, path)
    assert same.layout.names == lora.layout.names
    assert (same.r, same.alpha, same.dropout_p, same.training) == (4, 8.0, 0.0, False)
    assert same.extra_meta == {"round": "2", "tag": "ü"}  # the seed stored str(value)
    assert_same_outputs(llama, lora, same, x)
    same.save(tmp_path / "v1.safetensors")  # re-saved in format v1, loads the same
    assert_same_outputs(llama, lora, load_adapter(llama, tmp_path / "v1.safetensors"), x)


def test_legacy_pissa_loads_and_checks_its_base(llama, tmp_path):
    x = tiny.tokens()
    pissa = ml.ModulatedPiSSA(llama, r=6, targets=("o_proj", "gate_proj"), layer_range=(0.0, 0.5))
    randomize(pissa)
    path = tmp_path / "seed_pissa.safetensors"
    save_legacy_pissa(path, pissa_factors(pissa), 6, ["o_proj", "gate_proj"], (0.0, 0.5))
    same = ml.ModulatedPiSSA.from_checkpoint(llama, path)
    assert same.ranks() == pissa.ranks() and same.selection_score == "s_only"
    assert_same_outputs(llama, pissa, same, x)
    _expect_failure(tiny.llama(seed=3), path, r"different base model.*\|U\^T W Vh - S\|")


def test_legacy_gpt2_names(gpt2, tmp_path):
    x = tiny.tokens()
    lora = randomize(ml.ModulatedLoRA(gpt2, r=2, alpha=4.0, targets=("c_attn",)))
    path = tmp_path / "seed_gpt2.safetensors"
    save_legacy_lora(path, lora_factors(lora), 2, 4.0, ["c_attn"])
    assert_same_outputs(gpt2, lora, load_adapter(gpt2, path), x)


def test_legacy_metadata_disagreement_warns(llama, tmp_path, warnings_log):
    lora = randomize(ml.ModulatedLoRA(llama, r=2, targets=("q_proj",), layer_range=(0, 2)))
    path = tmp_path / "odd.safetensors"
    save_legacy_lora(path, lora_factors(lora), 2, 4.0, ["k_proj"], (2, 4))
    loaded = load_adapter(llama, path)
    assert loaded.layout.names == lora.layout.names  # the tensor keys win
    text = " ".join(warnings_log)
    assert "matches none of targets=['k_proj']" in text and "outside layer_range=(2, 4)" in text


def test_legacy_bad_files(llama, tmp_path):
    lora = randomize(ml.ModulatedLoRA(llama, r=2, targets=("q_proj",)))
    path = tmp_path / "seed.safetensors"
    save_legacy_lora(path, lora_factors(lora), 2, 4.0, ["q_proj"])
    _expect_failure(
        llama, rewrite(path, tmp_path / "a.safetensors", drop=["alpha"]), "'alpha' is missing"
    )
    _expect_failure(
        llama,
        rewrite(path, tmp_path / "r.safetensors", meta={"r": "3"}),
        r"q_proj': lora_A \(2, 32\), lora_B \(32, 2\): shapes give r=2 but the metadata says r=3",
    )
    bad_band = rewrite(path, tmp_path / "b.safetensors", meta={"layer_range": "1;2"})
    _expect_failure(llama, bad_band, "metadata 'layer_range' is malformed")
    _expect_failure(
        llama,
        rewrite(path, tmp_path / "k.safetensors", meta={"kind": "ia3"}),
        "unknown adapter kind 'ia3'",
    )
    _expect_failure(tiny.gpt2(), path, r"unexpected targets \['model.layers.0.self_attn.q_proj'")


# ---------------------------------------------------------------------------- atomic writes
def test_crash_during_save_keeps_the_previous_file(llama, tmp_path, monkeypatch):
    lora = make_lora(llama)
    path = tmp_path / "a.safetensors"
    lora.save(path, c=1.0)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file...
        raise OSError("disk full")  # ...then the write dies

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        next(lora.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        lora.save(path, c=2.0)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]
    with pytest.raises(OSError, match="disk full"):
        lora.save(tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no partial new file, no temp file
    monkeypatch.undo()
    assert load_adapter(llama, path).deployed_c == 1.0


def test_save_refuses_bad_input_and_writes_nothing(llama, tmp_path):
    lora = make_lora(llama)
    with pytest.raises(TypeError, match=r"extra_meta\['t'\] is a Tensor, which JSON cannot store"):
        lora.save(tmp_path / "x.safetensors", extra_meta={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="must be finite"):
        lora.save(tmp_path / "x.safetensors", c=float("nan"))
    with torch.no_grad():
        next(lora.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite adapter tensors: \['model.layers.1"):
        lora.save(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora.save(tmp_path / "no" / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_saved_file_gets_ordinary_permissions(llama, tmp_path):
    """safetensors creates files 0600; a checkpoint should be readable like any file (umask)."""
    path = tmp_path / "a.safetensors"
    old = os.umask(0o022)
    try:
        make_lora(llama).save(path)
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        make_lora(llama).save(path)  # overwriting keeps the file's own mode
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
