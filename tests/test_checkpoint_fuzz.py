"""Fuzzing the checkpoint reader: every damaged file is a CheckpointError naming it, or loads right.

Damage (hypothesis): truncations, byte flips anywhere (length prefix, header, data), edits of a
tensor's header entry (dtype, shape, offsets), and metadata values replaced by arbitrary JSON or
text. Metadata edits are tried both as they are (the checksum no longer matches) and resealed
(the checksum is recomputed, as a buggy writer would), so the field-by-field validation is
exercised and not only the checksum. A load counts as right when the adapter holds exactly the
file's tensors; a failed one must leave the model as it was.
"""

import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modlora as ml
from modlora.checkpoint import CheckpointError
from tests import tiny
from tests.checkpoint_files import sealed
from tests.helpers import assert_same_state, model_state

EXAMPLES = 60  # per damage kind; a few seconds each on a tiny model
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples every run (CI): failures reproduce
)
_CACHE: dict = {}


def _setup(tmp_path_factory):
    if not _CACHE:
        folder = tmp_path_factory.mktemp("fuzz")
        model = tiny.llama()
        for kind, make in (
            ("lora", lambda: tiny.signed_lora(model, r=2, targets=("q_proj", "down_proj"))),
            ("pissa", lambda: ml.ModulatedPiSSA(model, r=2, targets=("v_proj",))),
        ):
            make().save(folder / f"{kind}.safetensors", extra_meta={"round": 1}, c=1.5)
        _CACHE.update(model=model, folder=folder, state=model_state(model))
    return _CACHE


def _check(data: bytes, kind: str, tmp_path_factory) -> str:
    """Load ``data`` as a checkpoint: a CheckpointError naming the file, or a right load."""
    env = _setup(tmp_path_factory)
    model, path = env["model"], Path(env["folder"]) / "damaged.safetensors"
    path.write_bytes(data)
    try:
        adapter = ml.load_adapter(model, path, check_base="warn")
    except CheckpointError as err:
        assert str(path) in str(err), str(err)
        assert_same_state(model, env["state"])  # a failed load changed nothing
        return "refused"
    stored = safetensors.torch.load(data)
    loaded = {
        f"{name}.{role}": t
        for name, parts in adapter.target_tensors().items()
        for role, t in parts.items()
    }
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k], stored[k]) for k in stored), "loaded other tensors"
    return "loaded"


def _original(kind, tmp_path_factory) -> bytes:
    return (Path(_setup(tmp_path_factory)["folder"]) / f"{kind}.safetensors").read_bytes()


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<Q", len(raw)) + raw + body


KINDS = st.sampled_from(["lora", "pissa"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@SETTINGS
@given(kind=KINDS, cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncations(tmp_path_factory, kind, cut):
    data = _original(kind, tmp_path_factory)
    assert _check(data[: int(cut * len(data))], kind, tmp_path_factory) == "refused"


@SETTINGS
@given(kind=KINDS, where=st.floats(0.0, 1.0, exclude_max=True), bits=st.integers(1, 255))
def test_byte_flips(tmp_path_factory, kind, where, bits):
    data = bytearray(_original(kind, tmp_path_factory))
    data[int(where * len(data))] ^= bits
    _check(bytes(data), kind, tmp_path_factory)


@SETTINGS
@given(
    kind=KINDS,
    which=st.integers(0, 100),
    field=st.sampled_from(["dtype", "shape", "data_offsets"]),
    value=JSON | st.sampled_from(["F16", "BF16", "F8_E4M3", "I64", "BOOL"]),
)
def test_header_entry_edits(tmp_path_factory, kind, which, field, value):
    header, body = _split(_original(kind, tmp_path_factory))
    keys = sorted(k for k in header if k != "__metadata__")
    header[keys[which % len(keys)]][field] = value
    _check(_join(header, body), kind, tmp_path_factory)


@SETTINGS
@given(
    kind=KINDS,
    which=st.integers(0, 100),
    value=JSON.map(json.dumps) | st.text(max_size=12),
    reseal=st.booleans(),
)
def test_metadata_values(tmp_path_factory, kind, which, value, reseal):
    data = _original(kind, tmp_path_factory)
    header, body = _split(data)
    meta = header["__metadata__"]
    keys = sorted(k for k in meta if k != "integrity")
    key = keys[which % len(keys)]
    changed = meta[key] != value
    meta[key] = value
    if reseal:
        meta = sealed(meta, safetensors.torch.load(data))
    header["__metadata__"] = meta
    outcome = _check(_join(header, body), kind, tmp_path_factory)
    if changed and not reseal:  # the stored checksum no longer matches: always refused
        assert outcome == "refused"


@pytest.mark.parametrize("kind", ["lora", "pissa"])
def test_the_undamaged_files_load(tmp_path_factory, kind):
    assert _check(_original(kind, tmp_path_factory), kind, tmp_path_factory) == "loaded"
