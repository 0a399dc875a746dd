"""Checkpoint validation before anything is built: tensors, model fit, and base weights.

The tensors (complete roles, float and finite, the stored dtype, rank from shapes vs metadata via
:func:`~modlora.ranks.infer_rank`, the kind's own ``check_target``), the model (the one
:func:`~modlora.layout.fit_problems` check, plus the stored selection re-run on the model), and
the base (fingerprint mismatch, or for legacy PiSSA ``U_i^T W Vh_i = S_i``; the policy is
``raise``, ``warn`` or ``ignore``). Each check raises
:class:`~modlora.checkpoint.io.CheckpointError` listing everything wrong and touches nothing.
"""

from typing import Literal

import torch
from loguru import logger
from torch import nn

from ..fit import factor_shape, fit_problems
from ..layout import find_targets, resolve_target, unwrap_model
from ..ranks import infer_rank
from ..target import make_target
from .io import CheckpointError, weight_fingerprint
from .spec import Spec

BaseCheck = Literal["raise", "warn", "ignore"]

PISSA_BASE_RTOL = 1e-3
"""Legacy PiSSA base check: ``|U_i^T W Vh_i − S_i| <= 1e-3 · max(S)``. fp32 SVD round-off is
~1e-6 of ``max(S)``; a different base moves the projections by orders of magnitude more."""


def check_tensors(spec: Spec) -> dict[str, int]:
    """Roles complete, float and finite, ranks consistent; returns ``{target: r}``."""
    path, cls = spec.path, spec.cls
    if not spec.tensors:
        raise CheckpointError(f"{path}: holds no adapter tensors")
    if spec.shapes is not None and set(spec.shapes) != set(spec.tensors):
        odd = sorted(set(spec.shapes) ^ set(spec.tensors))
        raise CheckpointError(
            f"{path}: metadata 'shapes' names targets {odd} that the tensors do not (or the "
            "other way round)"
        )
    bad_values, bad_dtypes, incomplete = [], [], []
    want = spec.config["dtype"]
    for name, parts in spec.tensors.items():
        missing = [r for r in cls.roles if r not in parts]
        if missing:
            incomplete.append(f"{name}: missing {missing}")
        for role, t in parts.items():
            if t.dtype != want:
                bad_dtypes.append(f"{name}.{role}: {t.dtype}")
            elif not bool(torch.isfinite(t).all()):
                bad_values.append(f"{name}.{role}")
    if incomplete:
        raise CheckpointError(f"{path}: incomplete targets {incomplete}")
    if bad_dtypes:
        raise CheckpointError(f"{path}: tensors are not {want} as the metadata says: {bad_dtypes}")
    if bad_values:
        raise CheckpointError(f"{path}: non-finite values (NaN/inf) in {bad_values}")

    ranks = {}
    down_role, up_role = cls.factor_roles
    for name, parts in spec.tensors.items():
        shape = spec.shapes.get(name) if spec.shapes is not None else None
        d_in, d_out, meta_r = shape if shape is not None else (None, None, None)
        try:
            r = infer_rank(
                name,
                parts[down_role],
                parts[up_role],
                meta_r,
                d_in=d_in,
                d_out=d_out,
                down_label=down_role,
                up_label=up_role,
            )
            cls.check_target(spec.config, name, parts, r)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        ranks[name] = r
    return ranks


def layer_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """``{target: (d_in, d_out[, experts])}`` read from the tensors."""
    down_role, up_role = spec.cls.factor_roles
    return {
        name: factor_shape(parts[down_role], parts[up_role]) for name, parts in spec.tensors.items()
    }


def check_model(spec: Spec, model: nn.Module) -> None:
    """Raise listing missing / unexpected / mismatched targets."""
    absent, mismatched = fit_problems(model, layer_shapes(spec), "file")
    unexpected = [f"{n} (no such linear layer)" for n in absent]
    missing, note = [], ""
    if spec.cls.selects_targets and not absent and not mismatched:
        try:
            selected = find_targets(model, spec.targets, spec.exclude, spec.layer_range).names
        except (ValueError, TypeError) as err:
            selected, note = None, f"; the stored selection fails on this model: {err}"
        if selected is not None:
            missing = [n for n in selected if n not in spec.tensors]
            unexpected += [
                f"{n} (not selected by the stored targets/exclude/layer_range)"
                for n in spec.tensors
                if n not in selected
            ]
    if unexpected or mismatched or missing or note:
        raise CheckpointError(
            f"checkpoint {spec.path} does not fit this model ({type(model).__name__}): "
            f"missing targets {missing}, unexpected targets {unexpected}, "
            f"mismatched targets {mismatched}{note}"
        )


def check_base(spec: Spec, model: nn.Module, policy: BaseCheck) -> None:
    """Compare the model's weights with the ones the adapter was made on."""
    if policy == "ignore":
        return
    modules = dict(unwrap_model(model).named_modules())
    differ = []
    if spec.legacy and spec.kind == "pissa":  # the seed's PiSSA files carry no fingerprints
        for name, parts in spec.tensors.items():
            w = make_target(name, modules[name], None)
            if w.quantized or w.offloaded:
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
            target = resolve_target(model, name) if expected is not None else None
            if target is None:
                continue
            weight = target.weight
            if weight.device.type == "meta":
                logger.warning("cannot fingerprint the base weight of {}: it is on meta", name)
                continue
            if weight_fingerprint(weight) != expected:
                differ.append(name)
    if not differ:
        return
    msg = (
        f"checkpoint {spec.path} was made on a different base model: {len(differ)} target "
        f"weight(s) differ from the ones it was computed on: {differ[:8]}"
        f"{'...' if len(differ) > 8 else ''}"
    )
    if policy == "raise":
        raise CheckpointError(
            msg + " (pass check_base='warn' or 'ignore' if this base is intended)"
        )
    logger.warning("{}", msg)
