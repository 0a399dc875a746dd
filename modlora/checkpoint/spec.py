"""Checkpoint format v1, both ways: the metadata an adapter writes and the :class:`Spec` a file
parses into.

Tensors, keyed ``<target module name>.<role>`` (CPU, contiguous), with each kind's roles
(``lora``: ``lora_A (r, d_in)``, ``lora_B (d_out, r)``; ``pissa``: ``U (d_out, r)``, ``S (r,)``,
``Vh (r, d_in)``, ``delta_s (r,)``; ``history``: ``A (Σr, d_in)``, ``B (d_out, Σr)``, float32, each
round's ``c_k`` folded into B).

Metadata (str → str). ``format_version`` is a decimal integer; ``modlora_version``, ``kind`` and
``dtype`` are plain strings; every other value is JSON (``null`` where a field does not apply):
``r``, ``alpha``, ``targets``, ``exclude``, ``layer_range``, ``dropout``, ``init``,
``selection_score``, ``c`` (the deployed coefficient), ``extra_meta``, ``shapes``
(``{target: [d_in, d_out, r]}``), ``fingerprints`` (``{target: str}``), ``fingerprint_method``,
and the kind's own fields (its ``config()``: LoRA ``rank_pattern`` / ``alpha_pattern``, PiSSA
``delta_s_init`` / ``selected`` / ``tail_depth``, history ``round_info``).
"""

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from .. import checks
from .._version import __version__
from ..applied import base_weight
from ..digest import FINGERPRINT_METHOD, sample_fingerprint, tensors_digest, weight_fingerprint
from ..kinds import kind_class
from ..sharding import full_tensor
from .io import (
    INTEGRITY,
    CheckpointError,
    StoredFile,
    metadata_digest,
)

FORMAT_VERSION = 1
PLAIN_KEYS = ("format_version", "modlora_version", "kind", "dtype")
COMMON_KEYS = ("targets", "exclude", "layer_range", "c", "extra_meta", "shapes", "fingerprints")


@dataclass
class Spec:
    """Everything needed to rebuild an adapter, parsed and type-checked from one file.

    Attributes:
        path: the file.
        kind: the stored kind; ``cls`` its registered class.
        legacy: written by the seed code (no ``format_version``).
        config: the kind's config (``cls.parse_config``), ``dtype`` included.
        tensors: ``{target: {role: tensor}}``.
        targets, exclude, layer_range: the stored selection.
        shapes: ``{target: [d_in, d_out, r]}`` from the metadata (``None``: not stored).
        fingerprints: ``{target: base-weight fingerprint or None}``, by method ``base_method``
            (``"v2"`` from ``integrity``; ``"v1"`` in files written before it).
        c: the deployed coefficient; ``extra_meta``: the user's metadata.
        identity: digest of the file's tensors (not its metadata).
    """

    path: Path
    kind: str
    cls: type
    legacy: bool
    config: dict
    tensors: dict[str, dict[str, Tensor]]
    identity: str
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layer_range: tuple | None = None
    shapes: dict[str, list[int]] | None = None
    fingerprints: dict[str, str | None] = field(default_factory=dict)
    base_method: str = "v1"
    c: float | None = None
    extra_meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- write
def dumps(value, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable (finite numbers): {err}") from err


def base_fingerprints(adapter) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """``({target: v1 fingerprint}, {target: v2 fingerprint})`` of the base weights: the weights
    before any merge still in the model (:func:`~modlora.applied.base_weight`); ``None`` where
    the weight is not in memory."""
    v1, v2 = {}, {}
    for target in adapter.layout:
        weight = base_weight(adapter.model, target.name, target.weight)
        absent = weight.device.type == "meta"
        v1[target.name] = None if absent else weight_fingerprint(weight)
        v2[target.name] = None if absent else sample_fingerprint(weight)
    return v1, v2


def metadata_of(
    adapter, extra_meta: dict, c: float | None, tensors: dict[str, Tensor] | None = None
) -> dict[str, str]:
    """The str → str metadata of format v1. With the file's ``tensors``: base fingerprints and
    the ``integrity`` entry (digests of the tensors and of the metadata) too."""
    layout, ranks = adapter.layout, adapter.ranks()
    v1, v2 = base_fingerprints(adapter) if tensors is not None else ({}, {})
    meta = {
        "format_version": str(FORMAT_VERSION),
        "modlora_version": __version__,
        "kind": adapter.kind,
        "r": None,
        "alpha": None,
        "targets": list(layout.patterns),
        "exclude": list(layout.exclude),
        "layer_range": (
            [checks.scalar(v) for v in layout.layer_range]
            if layout.layer_range is not None
            else None
        ),
        "dtype": checks.dtype_name(adapter.dtype),
        "dropout": 0.0,
        "init": None,
        "selection_score": None,
        "c": c,
        "extra_meta": checks.json_object(extra_meta, "extra_meta"),
        "shapes": {t.name: [t.d_in, t.d_out, ranks[t.name]] for t in layout},
        "fingerprints": v1,
        "fingerprint_method": FINGERPRINT_METHOD,
        **adapter.config(),
    }
    meta = {k: (v if k in PLAIN_KEYS else dumps(v, k)) for k, v in meta.items()}
    if tensors is None:
        return meta
    integrity = {"tensors": tensors_digest(tensors), "base_method": "v2", "base": v2}
    integrity["metadata"] = metadata_digest(meta, integrity)
    return {**meta, INTEGRITY: dumps(integrity, INTEGRITY)}


def file_tensors(adapter) -> dict[str, Tensor]:
    """``{"<target>.<role>": tensor}``: detached CPU copies, contiguous, in model order (FSDP2
    shards gathered whole: a collective)."""
    return {
        f"{name}.{role}": full_tensor(t.detach()).to("cpu", copy=True).contiguous()
        for name, tensors in adapter.target_tensors().items()
        for role, t in tensors.items()
    }


# ---------------------------------------------------------------------------- parse
def parse_version(value: str, path) -> int:
    if not re.fullmatch(r"\d+", value or ""):
        raise CheckpointError(f"{path}: metadata 'format_version' is malformed: {value!r}")
    version = int(value)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this modlora supports "
            f"({FORMAT_VERSION}); upgrade modlora to load it"
        )
    return version


def loads(meta: Mapping[str, str], key: str, path):
    if key not in meta:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(
            f"{path}: metadata {key!r} is malformed (not JSON: {meta[key][:200]!r})"
        ) from err


def need(ok: bool, path, key: str, want: str, value) -> None:
    if not ok:
        raise CheckpointError(
            f"{path}: metadata {key!r} is malformed: expected {want}, got {value!r}"[:2000]
        )


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def parse_layer_range(value, path) -> tuple | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 2 and all(_is_num(v) for v in value)
    need(ok, path, "layer_range", "null or [lo, hi]", value)
    return tuple(value)


def kind_config(cls: type, meta: dict, path) -> dict:
    """``cls.parse_config(meta)``, its errors turned into a :class:`CheckpointError` naming the key."""
    try:
        return cls.parse_config(meta)
    except (ValueError, TypeError) as err:
        key = getattr(err, "argument", None)
        where = f"metadata {key!r} is malformed" if key else "metadata is malformed"
        raise CheckpointError(f"{path}: {where}: {err}") from None


def group_tensors(tensors: Mapping[str, Tensor], roles: tuple[str, ...], path) -> dict:
    """``{"<target>.<role>": t}`` → ``{target: {role: t}}``, refusing unknown roles."""
    grouped: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        name, _, role = key.rpartition(".")
        if not name or role not in roles:
            unknown.append(key)
            continue
        grouped.setdefault(name, {})[role] = tensor
    if unknown:
        raise CheckpointError(
            f"{path}: unexpected tensor keys {sorted(unknown)[:10]} "
            f"(expected '<target>.<role>' with roles {roles})"
        )
    return grouped


def parse_v1(file: StoredFile) -> Spec:
    """The :class:`Spec` of a v1 file; raises :class:`CheckpointError` naming a bad key."""
    meta, path = file.metadata, file.path
    parse_version(meta["format_version"], path)
    for key in ("kind", "dtype"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    try:
        cls = kind_class(meta["kind"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    decoded = {k: loads(meta, k, path) for k in COMMON_KEYS + cls.config_keys}
    for key in cls.optional_keys:
        if key in meta:
            decoded[key] = loads(meta, key, path)
    for key in ("targets", "exclude"):
        value = decoded[key]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        need(ok, path, key, "a list of strings", value)
    c = decoded["c"]
    need(c is None or _is_num(c), path, "c", "null or a finite number", c)
    need(
        isinstance(decoded["extra_meta"], dict),
        path,
        "extra_meta",
        "a JSON object",
        decoded["extra_meta"],
    )
    shapes = decoded["shapes"]
    ok = isinstance(shapes, dict) and all(
        isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and x > 0 for x in v)
        for v in shapes.values()
    )
    need(ok, path, "shapes", "{target: [d_in, d_out, r]}", shapes)
    fps = decoded["fingerprints"]
    ok = isinstance(fps, dict) and all(v is None or isinstance(v, str) for v in fps.values())
    need(ok, path, "fingerprints", "{target: str or null}", fps)
    method = "v1"
    if file.integrity is not None and "base" in file.integrity:
        fps, method = file.integrity["base"], file.integrity.get("base_method")
        ok = isinstance(fps, dict) and all(v is None or isinstance(v, str) for v in fps.values())
        need(ok and method == "v2", path, "integrity", "base fingerprints by method v2", fps)
    config = kind_config(cls, {**decoded, "dtype": meta["dtype"]}, path)
    return Spec(
        path=path,
        kind=cls.kind,
        cls=cls,
        legacy=False,
        config=config,
        tensors=group_tensors(file.tensors, cls.roles, path),
        identity=file.identity,
        targets=tuple(decoded["targets"]),
        exclude=tuple(decoded["exclude"]),
        layer_range=parse_layer_range(decoded["layer_range"], path),
        shapes=shapes,
        fingerprints=fps,
        base_method=method,
        c=None if c is None else float(c),
        extra_meta=decoded["extra_meta"],
    )
