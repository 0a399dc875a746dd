"""Checkpoint validation before anything is built: tensors, model fit, and base weights.

The tensors (complete roles, float and finite, the stored dtype, rank from shapes vs metadata via
:func:`~modlora.infer_rank`), the model (missing / unexpected / mismatched targets), and the base
(fingerprint mismatch, or for legacy PiSSA ``U_i^T W Vh_i = S_i``; the policy is ``raise``,
``warn`` or ``ignore``). Each check raises :class:`~modlora.checkpoint_io.CheckpointError`
listing everything wrong and touches nothing.
"""

from typing import Literal

import torch
from loguru import logger
from torch import nn

from .checkpoint_io import CheckpointError, weight_fingerprint
from .checkpoint_legacy import LEGACY_ROLES
from .checkpoint_spec import ROLES, _is_int, _Spec
from .layout import find_targets, is_target_type, make_target
from .ranks import check_rank_vector, infer_rank

BaseCheck = Literal["raise", "warn", "ignore"]

PISSA_BASE_RTOL = 1e-3
"""Legacy PiSSA base check: ``|U_i^T W Vh_i − S_i| <= 1e-3 · max(S)``. fp32 SVD round-off is
~1e-6 of ``max(S)``; a different base moves the projections by orders of magnitude more."""


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
