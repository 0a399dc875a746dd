"""Load an adapter from one checkpoint file: validate everything, then rebuild through its kind.

Loading validates everything before it builds anything, so a failed load leaves the model as it
was (no hooks, same weights, same ``requires_grad`` flags): the file (truncated, not
safetensors, metadata keys missing or malformed, unknown kind, newer format), the tensors
(complete roles, finite, dtype, rank from shapes vs metadata), the model (missing / unexpected /
mismatched targets), the base (the kind's ``base_check`` policy: PiSSA raises on another base,
LoRA and history warn; ``check_base=`` overrides), and double application. Then the registered
kind's ``rebuild`` makes the adapter.

Double application. PiSSA here is non-destructive (``W`` is never modified), so loading the same
round twice, or rounds in any order, is harmless in itself. What is wrong is applying one delta
twice: loading a file while an adapter with the very same tensors is attached to the model
raises, and attaching a copy of a delta that is attached or merged raises too
(:func:`~modlora.applied.refuse_double_delta`, every adapter's first attach guard).
"""

import contextlib
import gc
import os
from collections.abc import Callable, Iterator

from torch import nn

from ..applied import same_delta
from ..digest import tensors_digest
from ..fit import layout_of
from ..layout import unwrap_model
from ..rollback import model_rollback
from . import validate
from .io import CheckpointError, read_file
from .legacy import is_legacy, parse_legacy
from .spec import Spec, parse_v1
from .validate import check_model, check_tensors


def read_spec(path: str | os.PathLike, names=None) -> Spec:
    """Read and parse a checkpoint (v1 or legacy) into a :class:`Spec`; tensors not yet checked.

    Args:
        path: the file.
        names: the model's module names, for legacy files (``None``: no model).
    """
    file = read_file(path)
    if "format_version" in file.metadata:
        spec = parse_v1(file)
    elif is_legacy(file):
        spec = parse_legacy(file, names)
    else:
        raise CheckpointError(
            f"{file.path}: not a modlora checkpoint (no 'format_version' metadata and no legacy "
            f"tensor keys; keys {sorted(file.tensors)[:5]})"
        )
    if names is not None:  # model order first (errors name the first target), then the rest
        order = [n for n in names if n in spec.tensors]
        order += sorted(set(spec.tensors) - set(order))
        spec.tensors = {n: spec.tensors[n] for n in order}
    return spec


def build_adapter(
    model: nn.Module,
    spec: Spec,
    *,
    check_base: str | None = None,
    attach: bool | None = None,
    gate: Callable[[], bool] | None = None,
):
    """Validate ``spec`` against ``model``, then rebuild it through its kind (the one path from a
    parsed file to an adapter: :func:`load_adapter`, PEFT import). The model is unchanged on any
    failure. See :func:`load_adapter` for the arguments."""
    if check_base not in (None, "raise", "warn", "ignore"):
        raise ValueError(f"check_base must be 'raise', 'warn' or 'ignore', got {check_base!r}")
    model = unwrap_model(model)
    cls = spec.cls
    if not cls.attach_on_load and (attach or gate is not None):
        raise ValueError(
            f"attach/gate apply to history checkpoints only; {spec.path} holds a {cls.__name__} "
            "(use `with adapter(model, c=...)` or adapter.attach(model, c))"
        )
    check_tensors(spec)
    layout = check_model(spec, model)
    validate.check_base(spec, model, check_base or cls.base_check)
    flat = {f"{n}.{role}": t for n, parts in spec.tensors.items() for role, t in parts.items()}
    twin = same_delta(model, spec.kind, spec.tensors, lambda: tensors_digest(flat), merged=False)
    if twin is not None:
        raise CheckpointError(
            f"{spec.path}: an adapter loaded from the same checkpoint (or with the very same "
            f"tensors) is attached to this model ({twin}); loading it again would let its delta "
            "apply twice — reuse that object, or detach it before loading"
        )
    if layout is None:
        layout = layout_of(model, list(spec.tensors))
    tensors = {n: spec.tensors[n] for n in layout.names}
    adapter = None
    with model_rollback(model, {t.module: None for t in layout}):  # attach touches these
        try:
            adapter = cls.rebuild(model, layout, spec.config, tensors)
            adapter.deployed_c, adapter.extra_meta = spec.c, spec.extra_meta
            adapter.eval()
            if gate is not None:
                adapter.gate = gate
            if cls.attach_on_load and attach is not False:
                adapter.attach(model, 1.0)
        except BaseException:
            if adapter is not None and adapter.attached:
                adapter.detach()
            raise
    return adapter


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    check_base: str | None = None,
    attach: bool | None = None,
    gate: Callable[[], bool] | None = None,
    expect: type | None = None,
):
    """Rebuild an adapter from one checkpoint file alone (v1 or legacy), in eval mode.

    Args:
        model: the model to rebuild the adapter on (the base it was trained on).
        path: a file written by :func:`save_adapter` (or by the seed code).
        check_base: what a base-weight fingerprint mismatch does: ``"raise"``, ``"warn"`` or
            ``"ignore"``. Default: the kind's own policy (raise for PiSSA, whose factors are the
            base's own SVD; warn for LoRA and history).
        attach: attach on load — only kinds that attach on construction (a history) do so by
            default; ``False`` is accepted for every kind.
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
    model = unwrap_model(model)
    with gc_paused():
        spec = read_spec(path, [n for n, _ in model.named_modules()])
        if expect is not None and not issubclass(spec.cls, expect):
            raise TypeError(f"{spec.path} holds a {spec.cls.__name__}, not a {expect.__name__}")
        return build_adapter(model, spec, check_base=check_base, attach=attach, gate=gate)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (back on as it was, on any exit).

    A load makes thousands of short-lived objects (modules, tensors, header dicts) next to a
    model's many long-lived ones, so the collector's full passes over the model cost more than
    the load itself (measured: 110 -> 70 ms on 224 targets); a block this short only delays them.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
