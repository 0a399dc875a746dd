"""One ``.safetensors`` file per adapter: format v1, strict loading, and the seed's legacy format.

Format v1. Tensors, keyed ``<target module name>.<role>`` (CPU, contiguous, the adapter's dtype):

===========  ==============================================================================
kind         roles per target
===========  ==============================================================================
``lora``     ``lora_A (r, d_in)``, ``lora_B (d_out, r)``
``pissa``    ``U (d_out, r)``, ``S (r,)``, ``Vh (r, d_in)``, ``delta_s (r,)``
``history``  ``A (Σr, d_in)``, ``B (d_out, Σr)`` (float32, each round's ``c_k`` folded into B)
===========  ==============================================================================

Metadata (str → str). ``format_version`` is a decimal integer; ``modlora_version``, ``kind`` and
``dtype`` are plain strings; every other value is JSON (``null`` where a field does not apply):
``r``, ``alpha``, ``targets``, ``exclude``, ``layer_range``, ``dropout``, ``init``,
``selection_score``, ``c`` (the deployed coefficient), ``extra_meta``, ``shapes``
(``{target: [d_in, d_out, r]}``), ``fingerprints`` (``{target: str}``), ``fingerprint_method``;
LoRA adds ``rank_pattern`` / ``alpha_pattern``, PiSSA ``delta_s_init`` / ``selected`` /
``tail_depth``, history ``round_info``.

Base-weight fingerprint (:func:`weight_fingerprint`): blake2b-128 over dtype, shape and the raw
bytes of the stored weight when it has at most ``2**22`` elements; above that, over a strided
sample of ``2**20`` elements plus the float64 sum and sum of squares of the whole tensor (one
pass, no full CPU copy). Any dtype cast, transpose or fine-tuning step changes it; it is not a
cryptographic guarantee on huge layers, only a cheap, sensitive identity check.

Loading validates everything before it builds anything, so a failed load leaves the model as it
was (no hooks, same weights, same ``requires_grad`` flags): the file (truncated, not
safetensors, metadata keys missing or malformed, unknown kind, newer format), the tensors
(complete roles, finite, dtype, rank from shapes vs metadata via :func:`~modlora.infer_rank`),
the model (missing / unexpected / mismatched targets), the base (fingerprint mismatch raises for
PiSSA, warns for LoRA and history; ``check_base=`` overrides), and double application.

Double application. PiSSA here is non-destructive (``W`` is never modified), so loading the same
round twice, or rounds in any order, is harmless in itself. What is wrong is applying one
checkpoint's delta twice: loading a file while an adapter loaded from the same tensors is
attached to the same model raises, and attaching one copy while another is attached raises
too (through the adapter's ``attach_guards``). This holds for every kind (a history attaches on
load, so re-running a notebook cell would otherwise double it). There is no ``residual`` mode
that mutates ``W``, so there is nothing that could be subtracted twice.

Legacy (seed) files: LoRA ``A.<name with . as __> (r, d_in)`` / ``B.<…> (d_out, r)`` with
metadata ``r``, ``alpha``, ``targets`` (comma-separated), ``layer_range`` (``"lo,hi"``) and user
keys (kept as ``extra_meta``); PiSSA ``U./S./Vh./delta_s.<…>`` with ``kind=pissa`` and
``selection_score``. The target set is rebuilt from the tensor keys (matched against the model's
module names); a disagreement with ``targets`` / ``layer_range`` / the old default exclusions is
logged as a warning. Legacy PiSSA files carry no fingerprint: the base check verifies instead that
``U_i^T W Vh_i = S_i`` on every target.
"""

import hashlib
import json
import math
import os
import re
import secrets
import struct
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from loguru import logger
from torch import Tensor, nn

from .coefficient import validate_coeff
from .history import HistoryBake
from .hooks import AdapterStateError, LowRankAdapter
from .layout import find_targets, is_target_type, make_target
from .lora import ModulatedLoRA
from .pissa import SELECTION_SCORES, ModulatedPiSSA
from .ranks import check_rank_vector, infer_rank

FORMAT_VERSION = 1
KINDS = {"lora": ModulatedLoRA, "pissa": ModulatedPiSSA, "history": HistoryBake}
ROLES = {
    "lora": ("lora_A", "lora_B"),
    "pissa": ("U", "S", "Vh", "delta_s"),
    "history": ("A", "B"),
}
BaseCheck = Literal["raise", "warn", "ignore"]
FULL_HASH_LIMIT = 2**22
SAMPLE_SIZE = 2**20
FINGERPRINT_METHOD = "blake2b-128 v1 (full bytes up to 2**22 elements, else 2**20 strided + sums)"
LEGACY_EXCLUDE = ("vision_tower", "lm_head")
LEGACY_ROLES = {"lora": ("A", "B"), "pissa": ("U", "S", "Vh", "delta_s")}
_LEGACY_KEYS = ("r", "alpha", "targets", "layer_range", "kind", "selection_score")
PISSA_BASE_RTOL = 1e-3
"""Legacy PiSSA base check: ``|U_i^T W Vh_i − S_i| <= 1e-3 · max(S)``. fp32 SVD round-off is
~1e-6 of ``max(S)``; a different base moves the projections by orders of magnitude more."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is malformed, or does not fit the model it is loaded onto."""


# ---------------------------------------------------------------------------- fingerprint
@torch.no_grad()
def weight_fingerprint(weight: Tensor) -> str:
    """A cheap, sensitive identity of a base weight (see the module docstring).

    Args:
        weight: the layer's stored weight (any dtype, any device, as stored: no transpose).

    Returns:
        A 32-character hex digest.
    """
    w = weight.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{w.dtype}|{tuple(w.shape)}".encode())
    flat = w.reshape(-1)  # (numel,)
    if flat.numel() > FULL_HASH_LIMIT:
        stride = flat.numel() // SAMPLE_SIZE
        sums = torch.zeros(2, dtype=torch.float64)
        for chunk in flat.split(FULL_HASH_LIMIT):
            c64 = chunk.double()
            sums += torch.stack([c64.sum(), c64.square().sum()]).cpu()
        h.update(sums.numpy().tobytes())
        flat = flat[::stride]  # (~SAMPLE_SIZE,)
    h.update(flat.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------------------- atomic write
def _check_destination(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(temp)`` in the same folder, fsync, then rename.

    A crash or exception inside ``write`` leaves any previous file at ``path`` intact and
    removes the temporary file.

    Args:
        path: the destination.
        write: called with the temporary path; must create that file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = _check_destination(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass
    return path


# ---------------------------------------------------------------------------- save
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dumps(value, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable (finite numbers): {err}") from err


def save_adapter(
    adapter: LowRankAdapter,
    path: str | os.PathLike,
    extra_meta: Mapping | None = None,
    c: float | int | None = None,
) -> Path:
    """Write ``adapter`` to one ``.safetensors`` file, atomically (format v1).

    Args:
        adapter: a :class:`ModulatedLoRA`, :class:`ModulatedPiSSA` or :class:`HistoryBake`.
        path: the destination file.
        extra_meta: JSON-serialisable user metadata (unicode kept); default: the adapter's own
            ``extra_meta`` (so a loaded adapter re-saves with its metadata).
        c: the calibrated / deployed coefficient; default: ``adapter.deployed_c``.

    Returns:
        The path written.

    Raises:
        TypeError: an unknown adapter kind, or ``extra_meta`` that is not a JSON object.
        ValueError: a non-finite ``c`` or non-finite adapter tensors (nothing is written).
    """
    _check_destination(path)
    kind = getattr(adapter, "kind", None)
    if kind not in KINDS or not isinstance(adapter, KINDS[kind]):
        raise TypeError(f"cannot save a {type(adapter).__name__}: kinds are {sorted(KINDS)}")
    extra_meta = adapter.extra_meta if extra_meta is None else extra_meta
    if not isinstance(extra_meta, Mapping):
        raise TypeError(f"extra_meta must be a dict, got {type(extra_meta).__name__}")
    c = adapter.deployed_c if c is None else c
    if c is not None:
        c = validate_coeff(c)
        if not isinstance(c, float):
            raise ValueError("the deployed c stored in a checkpoint must be a scalar")
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter.state_dict().items()
    }
    bad = sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"refusing to save non-finite adapter tensors: {bad}")
    metadata = _metadata_of(adapter, kind, dict(extra_meta), c)

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)

    return atomic_write(path, write)


def _metadata_of(
    adapter: LowRankAdapter,
    kind: str,
    extra_meta: dict,
    c: float | None,
    fingerprints: bool = True,
) -> dict[str, str]:
    """The str → str metadata of format v1 (``fingerprints=False`` skips hashing the base)."""
    layout = adapter.layout
    ranks = adapter.ranks()
    prints = {}
    for t in layout if fingerprints else ():
        try:
            prints[t.name] = weight_fingerprint(t.module.weight)
        except Exception as err:  # a weight we cannot read (meta device...): no base check
            logger.warning("no base fingerprint for {}: {}", t.name, err)
            prints[t.name] = None
    lr = list(layout.layer_range) if layout.layer_range is not None else None
    meta = {
        "format_version": str(FORMAT_VERSION),
        "modlora_version": _version(),
        "kind": kind,
        "r": getattr(adapter, "r", None),
        "alpha": getattr(adapter, "alpha", None),
        "targets": list(layout.patterns),
        "exclude": list(layout.exclude),
        "layer_range": lr,
        "dtype": _dtype_name(getattr(adapter, "dtype", torch.float32)),
        "dropout": getattr(adapter, "dropout_p", 0.0),
        "init": getattr(adapter, "init", None),
        "selection_score": getattr(adapter, "selection_score", None),
        "c": c,
        "extra_meta": extra_meta,
        "shapes": {t.name: [t.d_in, t.d_out, ranks[t.name]] for t in layout},
        "fingerprints": prints,
        "fingerprint_method": FINGERPRINT_METHOD,
    }
    if kind == "lora":
        meta["rank_pattern"] = adapter.rank_pattern
        meta["alpha_pattern"] = adapter.alpha_pattern
    elif kind == "pissa":
        meta["delta_s_init"] = adapter.delta_s_init
        meta["selected"] = {k: v.tolist() for k, v in adapter.selected.items()}
        depth = adapter.tail_depth
        meta["tail_depth"] = depth if math.isfinite(depth) else None
    else:
        meta["round_info"] = adapter.round_info
    plain = ("format_version", "modlora_version", "kind", "dtype")
    return {k: (v if k in plain else _dumps(v, k)) for k, v in meta.items()}


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------- read
@dataclass
class _File:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, Tensor]
    identity: str  # digest of the tensor index and data (not the metadata)


def _read_header(path: Path, data: bytes) -> tuple[dict, int]:
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(
            f"{path}: truncated or not a safetensors file (header claims {n} bytes, "
            f"file has {len(data) - 8} after the length prefix)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path}: not a safetensors file (header is not JSON: {err})"
        ) from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def _read_file(path: str | os.PathLike) -> _File:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    header, start = _read_header(path, data)
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if start + max(ends, default=0) > len(data):
        raise CheckpointError(
            f"{path}: truncated (tensor data ends at byte {start + max(ends)}, "
            f"file has {len(data)} bytes)"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
    metadata = header.get("__metadata__") or {}
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(index, sort_keys=True).encode())
    h.update(memoryview(data)[start:])
    return _File(path, dict(metadata), tensors, h.hexdigest())


def _header_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        data = prefix + f.read(min(n, 100 * 2**20))
    header, _ = _read_header(path, data)
    return dict(header.get("__metadata__") or {})


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


# ---------------------------------------------------------------------------- parse
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


def _is_legacy(file: _File) -> bool:
    prefixes = tuple(f"{role}." for roles in LEGACY_ROLES.values() for role in roles)
    keys = list(file.tensors)
    return bool(keys) and all(k.startswith(prefixes) for k in keys)


def _parse_legacy(file: _File, model: nn.Module) -> _Spec:
    meta, path = file.metadata, file.path
    kind = meta.get("kind", "lora")
    if kind not in LEGACY_ROLES:
        raise CheckpointError(
            f"{path}: unknown adapter kind {kind!r} in a legacy file; known {sorted(LEGACY_ROLES)}"
        )
    by_flat = {n.replace(".", "__"): n for n, m in model.named_modules() if n}
    factors: dict[str, dict[str, Tensor]] = {}
    unknown, foreign = [], []
    for key, tensor in file.tensors.items():
        role, _, flat = key.partition(".")
        if role not in LEGACY_ROLES[kind] or not flat:
            unknown.append(key)
        elif flat not in by_flat:
            foreign.append(flat.replace("__", "."))
        else:
            factors.setdefault(by_flat[flat], {})[role] = tensor
    if unknown:
        raise CheckpointError(
            f"{path}: legacy {kind} file has unexpected tensor keys {sorted(unknown)[:10]} "
            f"(expected roles {LEGACY_ROLES[kind]})"
        )
    if foreign:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({type(model).__name__}): unexpected "
            f"targets {sorted(set(foreign))} (no such module)"
        )
    dtypes = {t.dtype for t in file.tensors.values()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtype is None or not dtype.is_floating_point:
        raise CheckpointError(f"{path}: legacy tensors must share one float dtype, got {dtypes}")
    if "r" not in meta:
        raise CheckpointError(f"{path}: metadata key 'r' is missing")
    _need(
        re.fullmatch(r"\d+", meta["r"]) is not None and int(meta["r"]) > 0,
        path,
        "r",
        "a positive int",
        meta["r"],
    )
    spec = _Spec(kind=kind, legacy=True, factors=factors, dtype=dtype, r=int(meta["r"]))
    names = [n for n, _ in model.named_modules() if n in factors]  # model order
    spec.targets = tuple("^" + re.escape(n) + "$" for n in names)  # exactly the stored targets
    spec.extra_meta = {k: v for k, v in meta.items() if k not in _LEGACY_KEYS}
    if kind == "lora":
        if "alpha" not in meta:
            raise CheckpointError(f"{path}: metadata key 'alpha' is missing")
        try:
            alpha = float(meta["alpha"])
        except ValueError:
            alpha = float("nan")
        _need(math.isfinite(alpha) and alpha > 0, path, "alpha", "a positive number", meta["alpha"])
        spec.alpha = alpha
    else:
        score = meta.get("selection_score", "s_only")
        _need(
            score in SELECTION_SCORES, path, "selection_score", f"one of {SELECTION_SCORES}", score
        )
        spec.selection_score = score
    _check_legacy_selection(meta, names, model, path)
    return spec


def _parse_legacy_range(value: str | None, path) -> tuple | None:
    if value is None or value.strip() in ("", "None", "null"):
        return None
    parts = value.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        if all(re.fullmatch(r"\s*-?\d+\s*", p) for p in parts):
            return int(parts[0]), int(parts[1])
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise CheckpointError(
            f"{path}: metadata 'layer_range' is malformed: expected 'lo,hi', got {value!r}"
        ) from None


def _check_legacy_selection(meta: dict, names: list[str], model: nn.Module, path) -> None:
    """Warn where the tensor keys disagree with the legacy targets / layer_range / exclusions.

    Warnings, not errors: the seed's exact matching and rounding rules are not recorded, and the
    tensor keys say exactly which layers were adapted. Fractional bands allow every rounding.
    """
    patterns = [p.strip() for p in meta.get("targets", "").split(",") if p.strip()]
    band = _parse_legacy_range(meta.get("layer_range"), path)
    block = re.compile(r"\.layers\.(\d+)\.")
    indices = [int(m.group(1)) for n, _ in model.named_modules() if (m := block.search(n + "."))]
    depth = 1 + max(indices, default=-1)

    def matches(p: str, name: str) -> bool:
        if p == "all-linear":
            return True
        try:
            return re.search(p, name) is not None
        except re.error:
            return p in name

    odd = []
    for name in names:
        if any(x in name for x in LEGACY_EXCLUDE):
            odd.append(f"{name}: matches the old default exclusions {LEGACY_EXCLUDE}")
        if patterns and not any(matches(p, name) for p in patterns):
            odd.append(f"{name}: matches none of targets={patterns}")
        found = block.search(name + ".")
        if band is None or not found:
            continue
        i, (lo, hi) = int(found.group(1)), band
        if isinstance(lo, int) and isinstance(hi, int):
            inside = lo <= i < hi
        else:
            inside = math.floor(lo * depth) <= i <= math.ceil(hi * depth)
        if not inside:
            odd.append(f"{name}: block {i} outside layer_range={band}")
    if odd:
        logger.warning(
            "legacy checkpoint {}: tensor keys disagree with its metadata (the tensors win): {}",
            path,
            odd,
        )


# ---------------------------------------------------------------------------- validate
def _check_tensors(spec: _Spec, path) -> dict[str, int]:
    """Roles complete, float and finite, ranks consistent; returns ``{target: r}``."""
    roles = _roles(spec)
    if not spec.factors:
        raise CheckpointError(f"{path}: holds no adapter tensors")
    if spec.shapes is not None and set(spec.shapes) != set(spec.factors):
        raise CheckpointError(
            f"{path}: metadata 'shapes' names targets {sorted(set(spec.shapes) ^ set(spec.factors))} "
            "that the tensors do not (or the other way round)"
        )
    bad_values, bad_dtypes, incomplete = [], [], []
    want_dtype = torch.float32 if spec.kind == "history" else spec.dtype
    for name, parts in spec.factors.items():
        missing = [r for r in roles if r not in parts]
        if missing:
            incomplete.append(f"{name}: missing {missing}")
        for role, t in parts.items():
            if t.dtype != want_dtype:
                bad_dtypes.append(f"{name}.{role}: {t.dtype}")
            elif not bool(torch.isfinite(t).all()):
                bad_values.append(f"{name}.{role}")
    if incomplete:
        raise CheckpointError(f"{path}: incomplete targets {incomplete}")
    if bad_dtypes:
        raise CheckpointError(
            f"{path}: tensors are not {want_dtype} as the metadata says: {bad_dtypes}"
        )
    if bad_values:
        raise CheckpointError(f"{path}: non-finite values (NaN/inf) in {bad_values}")

    ranks, history_ranks = {}, {}
    for info in spec.round_info:
        for name, r in (info.get("ranks") or {}).items():
            history_ranks[name] = history_ranks.get(name, 0) + r if _is_int(r) else None
    for name, parts in spec.factors.items():
        shape = spec.shapes.get(name) if spec.shapes is not None else None
        d_in, d_out, meta_r = shape if shape is not None else (None, None, None)
        if spec.kind == "pissa":
            down, up, labels = parts["Vh"], parts["U"], ("Vh", "U")
        else:
            down, up, labels = parts[roles[0]], parts[roles[1]], roles
        expected = meta_r
        if spec.kind == "lora" and expected is None:
            expected = spec.rank_pattern.get(name, spec.r)
        try:
            r = infer_rank(
                name,
                down,
                up,
                expected,
                d_in=d_in,
                d_out=d_out,
                down_label=labels[0],
                up_label=labels[1],
            )
            if spec.kind == "lora" and r != spec.rank_pattern.get(name, spec.r):
                raise ValueError(
                    f"target {name!r}: {labels[0]} {tuple(down.shape)}, {labels[1]} "
                    f"{tuple(up.shape)}: shapes give r={r} but the metadata says "
                    f"r={spec.rank_pattern.get(name, spec.r)}"
                )
            if spec.kind == "pissa":
                if r > spec.r:
                    raise ValueError(
                        f"target {name!r}: U {tuple(up.shape)}, Vh {tuple(down.shape)}: "
                        f"r={r} exceeds the metadata r={spec.r}"
                    )
                check_rank_vector(name, "S", parts["S"], r)
                check_rank_vector(name, "delta_s", parts["delta_s"], r)
            if spec.kind == "history" and history_ranks.get(name) not in (None, r):
                raise ValueError(
                    f"target {name!r}: A {tuple(down.shape)}, B {tuple(up.shape)}: r={r} but "
                    f"round_info ranks sum to {history_ranks[name]}"
                )
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        ranks[name] = r
    return ranks


def _layer_shapes(spec: _Spec) -> dict[str, tuple[int, int]]:
    """``{target: (d_in, d_out)}`` read from the tensors."""
    down_role, up_role = ("Vh", "U") if spec.kind == "pissa" else _roles(spec)[:2]
    return {
        name: (parts[down_role].shape[-1], parts[up_role].shape[-2])
        for name, parts in spec.factors.items()
    }


def _roles(spec: _Spec) -> tuple[str, ...]:
    return LEGACY_ROLES[spec.kind] if spec.legacy else ROLES[spec.kind]


def _check_model(spec: _Spec, model: nn.Module, path) -> None:
    """Raise listing missing / unexpected / mismatched targets."""
    modules = dict(model.named_modules())
    unexpected, mismatched = [], []
    for name, (d_in, d_out) in _layer_shapes(spec).items():
        module = modules.get(name)
        if module is None or not is_target_type(module):
            unexpected.append(f"{name} (no such linear layer)")
            continue
        t = make_target(name, module, None)
        if (t.d_in, t.d_out) != (d_in, d_out):
            mismatched.append(
                f"{name}: file (d_in={d_in}, d_out={d_out}) vs model (d_in={t.d_in}, d_out={t.d_out})"
            )
    missing, note = [], ""
    if spec.kind != "history" and not unexpected and not mismatched:
        try:
            selected = find_targets(model, spec.targets, spec.exclude, spec.layer_range).names
        except (ValueError, TypeError) as err:
            selected, note = None, f"; the stored selection fails on this model: {err}"
        if selected is not None:
            missing = [n for n in selected if n not in spec.factors]
            unexpected += [
                f"{n} (not selected by the stored targets/exclude/layer_range)"
                for n in spec.factors
                if n not in selected
            ]
    if unexpected or mismatched or missing or note:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({type(model).__name__}): "
            f"missing targets {missing}, unexpected targets {unexpected}, "
            f"mismatched targets {mismatched}{note}"
        )


def _check_base(spec: _Spec, model: nn.Module, path, policy: BaseCheck) -> None:
    if policy == "ignore":
        return
    modules = dict(model.named_modules())
    differ = []
    if spec.legacy and spec.kind == "pissa":
        for name, parts in spec.factors.items():
            w = make_target(name, modules[name], None)
            if w.quantized:
                continue
            with torch.no_grad():
                u = parts["U"].to(w.device, torch.float32)
                vh = parts["Vh"].to(w.device, torch.float32)
                s = parts["S"].to(w.device, torch.float32)
                proj = ((u.T @ w.dense_weight().float()) * vh).sum(dim=1)  # (r,) = U_i^T W Vh_i
                err = float((proj - s).abs().max())
            if err > PISSA_BASE_RTOL * float(s.abs().max()):
                differ.append(f"{name} (|U^T W Vh - S| = {err:.3g})")
    else:
        for name, expected in spec.fingerprints.items():
            if expected is None or name not in modules:
                continue
            try:
                actual = weight_fingerprint(modules[name].weight)
            except Exception as err:  # an unreadable weight (meta device...): cannot check
                logger.warning("cannot fingerprint the base weight of {}: {}", name, err)
                continue
            if actual != expected:
                differ.append(name)
    if not differ:
        return
    msg = (
        f"checkpoint {path} was made on a different base model: {len(differ)} target weight(s) "
        f"differ from the ones it was computed on: {differ[:8]}{'...' if len(differ) > 8 else ''}"
    )
    if policy == "raise":
        raise CheckpointError(
            msg + " (pass check_base='warn' or 'ignore' if this base is intended)"
        )
    logger.warning("{}", msg)


# ---------------------------------------------------------------------------- double application
_LOADED: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, Path, weakref.ref]]]"
_LOADED = weakref.WeakKeyDictionary()


def _attached_twin(model: nn.Module, identity: str, me: LowRankAdapter | None = None):
    for ident, path, ref in _LOADED.get(model, []):
        other = ref()
        if ident == identity and other is not None and other is not me and other.attached:
            return path, other
    return None


def _register(model: nn.Module, identity: str, path: Path, adapter: LowRankAdapter) -> None:
    entries = [e for e in _LOADED.get(model, []) if e[2]() is not None]
    entries.append((identity, path, weakref.ref(adapter)))
    _LOADED[model] = entries
    model_ref = weakref.ref(model)

    def guard(adapter: LowRankAdapter) -> None:
        model = model_ref()
        twin = _attached_twin(model, identity, adapter) if model is not None else None
        if twin is not None:
            raise AdapterStateError(
                f"{type(adapter).__name__} from {path} cannot attach: a copy loaded from the same "
                f"checkpoint ({twin[0]}) is already attached to this model, so its delta would "
                "apply twice; detach that one first"
            )

    guards = getattr(adapter, "attach_guards", None)
    if guards is not None:
        guards.append(guard)


# ---------------------------------------------------------------------------- load
def _requires_grad(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    check_base: str | None = None,
    attach: bool | None = None,
    gate: Callable[[], bool] | None = None,
    expect: type | None = None,
) -> LowRankAdapter:
    """Rebuild an adapter from one checkpoint file alone (v1 or legacy), in eval mode.

    Args:
        model: the model to rebuild the adapter on (the base it was trained on).
        path: a file written by :func:`save_adapter` (or by the seed code).
        check_base: what a base-weight fingerprint mismatch does: ``"raise"``, ``"warn"`` or
            ``"ignore"``. Default: raise for PiSSA (its factors are the base's own SVD), warn
            for LoRA and history.
        attach: history only — attach on load (default True, like the constructor).
            ``False`` is accepted for every kind; LoRA / PiSSA never attach on load.
        gate: history only — the gate callable (see :class:`~modlora.HistoryBake`).
        expect: a class the stored kind must be (checked before anything is built).

    Returns:
        The adapter, with ``deployed_c`` and ``extra_meta`` set from the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: (a ``ValueError``) the file is truncated or not safetensors, metadata
            is missing or malformed, the kind is unknown, the format is newer, tensors are
            non-finite or contradict the metadata's ranks, the model's targets differ, the base
            differs (PiSSA), or a copy of this checkpoint is already attached to the model.
            The model is unchanged.
        TypeError: the stored kind is not ``expect``.
    """
    if check_base not in (None, "raise", "warn", "ignore"):
        raise ValueError(f"check_base must be 'raise', 'warn' or 'ignore', got {check_base!r}")
    file = _read_file(path)
    if "format_version" in file.metadata:
        spec = _parse_v1(file)
    elif _is_legacy(file):
        spec = _parse_legacy(file, model)
    else:
        raise CheckpointError(
            f"{file.path}: not a modlora checkpoint (no 'format_version' metadata and no legacy "
            f"tensor keys; keys {sorted(file.tensors)[:5]})"
        )
    order = [n for n, _ in model.named_modules() if n in spec.factors]  # model order, then the rest
    order += sorted(set(spec.factors) - set(order))
    spec.factors = {n: spec.factors[n] for n in order}
    cls = KINDS[spec.kind]
    if expect is not None and not issubclass(cls, expect):
        raise TypeError(f"{file.path} holds a {cls.__name__}, not a {expect.__name__}")
    if spec.kind != "history" and (attach or gate is not None):
        raise ValueError(
            f"attach/gate apply to history checkpoints only; {file.path} holds a {cls.__name__} "
            "(use `with adapter(model, c=...)` or adapter.attach(model, c))"
        )
    _check_tensors(spec, file.path)
    _check_model(spec, model, file.path)
    _check_base(spec, model, file.path, check_base or ("raise" if spec.kind == "pissa" else "warn"))
    twin = _attached_twin(model, file.identity)
    if twin is not None:
        raise CheckpointError(
            f"{file.path}: a {type(twin[1]).__name__} loaded from the same checkpoint "
            f"({twin[0]}) is attached to this model; loading it again would let its delta apply "
            "twice — reuse that object, or detach it before loading"
        )
    flags = _requires_grad(model)
    adapter = None
    try:
        adapter = _build(spec, model, attach is not False, gate)
        adapter.deployed_c, adapter.extra_meta = spec.c, spec.extra_meta
        adapter.eval()
        _register(model, file.identity, file.path, adapter)
    except BaseException:
        if adapter is not None and adapter.attached:
            adapter.detach()
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        raise
    return adapter


def _build(spec: _Spec, model: nn.Module, attach: bool, gate) -> LowRankAdapter:
    lr = spec.layer_range
    if spec.kind == "history":
        factors = {n: (p["A"], p["B"]) for n, p in spec.factors.items()}
        return HistoryBake.from_factors(model, factors, spec.round_info, gate=gate, attach=attach)
    if spec.kind == "pissa":
        factors = {n: (p["U"], p["S"], p["Vh"]) for n, p in spec.factors.items()}
        adapter = ModulatedPiSSA.from_factors(
            model,
            factors,
            r=spec.r,
            selection_score=spec.selection_score,
            targets=spec.targets,
            exclude=spec.exclude,
            layer_range=lr,
            delta_s_init=spec.delta_s_init,
            dtype=spec.dtype,
        )
        adapter.load_state_dict({f"{n}.delta_s": p["delta_s"] for n, p in spec.factors.items()})
        adapter.selected = dict(spec.selected)
        adapter.tail_depth = spec.tail_depth
        return adapter
    a_role, b_role = LEGACY_ROLES["lora"] if spec.legacy else ROLES["lora"]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the throw-away init must not move the RNG
        adapter = ModulatedLoRA(
            model,
            r=spec.r,
            alpha=spec.alpha,
            targets=spec.targets,
            exclude=spec.exclude,
            layer_range=lr,
            dropout=spec.dropout,
            init=spec.init,
            dtype=spec.dtype,
            rank_pattern=spec.rank_pattern,
            alpha_pattern=spec.alpha_pattern,
        )
    state = {}
    for n, p in spec.factors.items():
        state[f"{n}.lora_A"], state[f"{n}.lora_B"] = p[a_role], p[b_role]
    adapter.load_state_dict(state)
    return adapter
