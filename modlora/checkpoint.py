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

Base-weight fingerprints come from :func:`weight_fingerprint` (see :mod:`modlora.checkpoint_io`).
Legacy (seed) files are described in :mod:`modlora.checkpoint_legacy`.

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

The pieces live in flat modules: :mod:`modlora.checkpoint_io` (fingerprint, atomic write, safe
reads), :mod:`modlora.checkpoint_spec` (v1 metadata parsing), :mod:`modlora.checkpoint_legacy`
(seed format), :mod:`modlora.checkpoint_validate` (checks before building). Their public names
(and the private ones other modules use) are re-exported here, as ``name as name``.
"""

import json
import math
import os
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from loguru import logger
from torch import nn

from .checkpoint_io import (
    FINGERPRINT_METHOD,
    CheckpointError,
    _check_destination,
    _read_file,
    atomic_write,
    weight_fingerprint,
)
from .checkpoint_io import FULL_HASH_LIMIT as FULL_HASH_LIMIT
from .checkpoint_io import SAMPLE_SIZE as SAMPLE_SIZE
from .checkpoint_io import _File as _File
from .checkpoint_legacy import LEGACY_EXCLUDE as LEGACY_EXCLUDE
from .checkpoint_legacy import LEGACY_ROLES, _is_legacy, _parse_legacy
from .checkpoint_spec import FORMAT_VERSION, KINDS, ROLES, _parse_v1, _Spec
from .checkpoint_spec import read_metadata as read_metadata
from .checkpoint_validate import PISSA_BASE_RTOL as PISSA_BASE_RTOL
from .checkpoint_validate import BaseCheck as BaseCheck
from .checkpoint_validate import _check_base, _check_model, _check_tensors
from .coefficient import validate_coeff
from .history import HistoryBake
from .hooks import AdapterStateError, LowRankAdapter
from .lora import ModulatedLoRA
from .pissa import ModulatedPiSSA


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
