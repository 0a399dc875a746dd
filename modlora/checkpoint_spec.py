"""Format v1 metadata: the parsed spec of one checkpoint, its type-checked parsing, read_metadata.

:class:`_Spec` holds everything needed to rebuild an adapter; :func:`_parse_v1` fills it from a
v1 file's str → str metadata (see :mod:`modlora.checkpoint` for the schema), raising
:class:`~modlora.checkpoint_io.CheckpointError` naming the first malformed key. The small
helpers (``_loads``, ``_need``, ...) are shared with the legacy parser.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checkpoint_io import CheckpointError, _File, _header_metadata
from .history import HistoryBake
from .lora import ModulatedLoRA
from .pissa import SELECTION_SCORES, ModulatedPiSSA

FORMAT_VERSION = 1
KINDS = {"lora": ModulatedLoRA, "pissa": ModulatedPiSSA, "history": HistoryBake}
ROLES = {
    "lora": ("lora_A", "lora_B"),
    "pissa": ("U", "S", "Vh", "delta_s"),
    "history": ("A", "B"),
}


@dataclass
class _Spec:
    """Everything needed to rebuild an adapter, parsed and type-checked from one file."""

    kind: str
    legacy: bool
    factors: dict[str, dict[str, Tensor]]  # {target: {role: tensor}}
    dtype: torch.dtype
    r: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layer_range: tuple | None = None
    dropout: float = 0.0
    init: str = "zero"
    selection_score: str = "s_only"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    delta_s_init: float = 0.0
    selected: dict = field(default_factory=dict)
    tail_depth: float = float("nan")
    round_info: list = field(default_factory=list)
    shapes: dict[str, list[int]] | None = None
    fingerprints: dict[str, str | None] = field(default_factory=dict)
    c: float | None = None
    extra_meta: dict = field(default_factory=dict)


def _parse_version(value: str, path) -> int:
    if not re.fullmatch(r"\d+", value or ""):
        raise CheckpointError(f"{path}: metadata 'format_version' is malformed: {value!r}")
    version = int(value)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this modlora supports "
            f"({FORMAT_VERSION}); upgrade modlora to load it"
        )
    return version


def _loads(meta: dict, key: str, path):
    if key not in meta:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}: metadata {key!r} is malformed (not JSON: {meta[key]!r})"
        ) from err


def _need(ok: bool, path, key: str, want: str, value) -> None:
    if not ok:
        raise CheckpointError(
            f"{path}: metadata {key!r} is malformed: expected {want}, got {value!r}"
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _parse_dtype(value, path) -> torch.dtype:
    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    _need(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        path,
        "dtype",
        "a floating torch dtype name",
        value,
    )
    return dtype


def _parse_layer_range(value, path) -> tuple | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 2 and all(_is_num(v) for v in value)
    _need(ok, path, "layer_range", "null or [lo, hi]", value)
    return tuple(value)


def _group_factors(tensors: dict[str, Tensor], roles: tuple[str, ...], path) -> dict:
    factors: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        name, _, role = key.rpartition(".")
        if not name or role not in roles:
            unknown.append(key)
            continue
        factors.setdefault(name, {})[role] = tensor
    if unknown:
        raise CheckpointError(
            f"{path}: unexpected tensor keys {sorted(unknown)[:10]} "
            f"(expected '<target>.<role>' with roles {roles})"
        )
    return factors


def _parse_v1(file: _File) -> _Spec:
    meta, path = file.metadata, file.path
    _parse_version(meta["format_version"], path)
    kind = meta.get("kind")
    if kind is None:
        raise CheckpointError(f"{path}: metadata key 'kind' is missing")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: unknown adapter kind {kind!r}; known kinds {sorted(KINDS)}")
    if "dtype" not in meta:
        raise CheckpointError(f"{path}: metadata key 'dtype' is missing")
    spec = _Spec(
        kind=kind,
        legacy=False,
        factors=_group_factors(file.tensors, ROLES[kind], path),
        dtype=_parse_dtype(meta["dtype"], path),
    )
    get = {
        k: _loads(meta, k, path) for k in ("targets", "exclude", "layer_range", "c", "extra_meta")
    }
    get["shapes"] = _loads(meta, "shapes", path)
    get["fingerprints"] = _loads(meta, "fingerprints", path)
    for key in ("targets", "exclude"):
        value = get[key]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        _need(ok, path, key, "a list of strings", value)
    spec.targets, spec.exclude = tuple(get["targets"]), tuple(get["exclude"])
    spec.layer_range = _parse_layer_range(get["layer_range"], path)
    _need(get["c"] is None or _is_num(get["c"]), path, "c", "null or a finite number", get["c"])
    spec.c = None if get["c"] is None else float(get["c"])
    _need(
        isinstance(get["extra_meta"], dict), path, "extra_meta", "a JSON object", get["extra_meta"]
    )
    spec.extra_meta = get["extra_meta"]
    shapes = get["shapes"]
    ok = isinstance(shapes, dict) and all(
        isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v)
        for v in shapes.values()
    )
    _need(ok, path, "shapes", "{target: [d_in, d_out, r]}", shapes)
    spec.shapes = shapes
    fps = get["fingerprints"]
    ok = isinstance(fps, dict) and all(v is None or isinstance(v, str) for v in fps.values())
    _need(ok, path, "fingerprints", "{target: str or null}", fps)
    spec.fingerprints = fps

    if kind in ("lora", "pissa"):
        r = _loads(meta, "r", path)
        _need(_is_int(r) and r > 0, path, "r", "a positive int", r)
        spec.r = r
    if kind == "lora":
        alpha = _loads(meta, "alpha", path)
        _need(_is_num(alpha) and alpha > 0, path, "alpha", "a positive number", alpha)
        dropout = _loads(meta, "dropout", path)
        _need(_is_num(dropout) and 0 <= dropout < 1, path, "dropout", "a number in [0, 1)", dropout)
        init = _loads(meta, "init", path)
        _need(init in ("zero", "signed"), path, "init", "'zero' or 'signed'", init)
        rp, ap = _loads(meta, "rank_pattern", path), _loads(meta, "alpha_pattern", path)
        ok = isinstance(rp, dict) and all(_is_int(v) and v > 0 for v in rp.values())
        _need(ok, path, "rank_pattern", "{target: positive int}", rp)
        ok = isinstance(ap, dict) and all(_is_num(v) and v > 0 for v in ap.values())
        _need(ok, path, "alpha_pattern", "{target: positive number}", ap)
        spec.alpha, spec.dropout, spec.init = float(alpha), float(dropout), init
        spec.rank_pattern, spec.alpha_pattern = rp, ap
    elif kind == "pissa":
        score = _loads(meta, "selection_score", path)
        _need(
            score in SELECTION_SCORES, path, "selection_score", f"one of {SELECTION_SCORES}", score
        )
        ds0 = _loads(meta, "delta_s_init", path)
        _need(_is_num(ds0), path, "delta_s_init", "a finite number", ds0)
        spec.selection_score, spec.delta_s_init = score, float(ds0)
        if "selected" in meta:
            sel = _loads(meta, "selected", path)
            ok = isinstance(sel, dict) and all(
                isinstance(v, list) and all(_is_int(i) for i in v) for v in sel.values()
            )
            _need(ok, path, "selected", "{target: [int, ...]}", sel)
            spec.selected = {k: torch.tensor(v, dtype=torch.long) for k, v in sel.items()}
        depth = _loads(meta, "tail_depth", path) if "tail_depth" in meta else None
        _need(depth is None or _is_num(depth), path, "tail_depth", "null or a number", depth)
        spec.tail_depth = float("nan") if depth is None else float(depth)
    else:
        info = _loads(meta, "round_info", path)
        ok = isinstance(info, list) and all(isinstance(x, dict) for x in info)
        _need(ok, path, "round_info", "a list of objects", info)
        spec.round_info = info
    return spec


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint, decoded, without loading its tensors.

    v1 files: JSON fields decoded (``format_version`` as an int). Legacy files: the raw
    str → str metadata plus ``"format_version": 0``.

    Raises:
        CheckpointError: the file is not a safetensors file, or a JSON field is malformed.
    """
    raw = _header_metadata(path)
    if "format_version" not in raw:
        return {**raw, "format_version": 0}
    out = {}
    for key, value in raw.items():
        if key in ("modlora_version", "kind", "dtype"):
            out[key] = value
        elif key == "format_version":
            out[key] = _parse_version(value, path)
        else:
            out[key] = _loads(raw, key, path)
    return out
