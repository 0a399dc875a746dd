"""Checkpoint validation before anything is built: tensors, model fit, and base weights.

The tensors (complete roles, float and finite, the stored dtype, rank from shapes vs metadata via
:func:`~modlora.ranks.infer_rank`, the kind's own ``check_target``), the model (the one
:func:`~modlora.layout.fit_problems` check, plus the stored selection re-run on the model), and
the base (fingerprint mismatch by the file's own method, and the kind's own test such as PiSSA's
``U_i^T W Vh_i = S_i``; the policy is ``raise``, ``warn`` or ``ignore``). Each check raises
:class:`~modlora.checkpoint.io.CheckpointError` listing everything wrong and touches nothing.
"""

import math
from collections.abc import Mapping
from typing import Literal

import torch
from loguru import logger
from torch import Tensor, nn

from ..applied import base_weight
from ..digest import FINGERPRINTS
from ..fit import factor_shape, fit_problems
from ..layout import TargetLayout, find_targets, resolve_targets
from ..ranks import infer_rank
from .io import CheckpointError
from .spec import Spec

BaseCheck = Literal["raise", "warn", "ignore"]


def non_finite(tensors: dict[str, dict[str, Tensor]]) -> list[str]:
    """``"<target>.<role>"`` of the tensors holding NaN or inf (one fused pass when none do)."""
    flat = {f"{n}.{r}": t for n, parts in tensors.items() for r, t in parts.items() if t.numel()}
    if not flat:
        return []
    peaks = torch._foreach_norm(list(flat.values()), math.inf)  # max |t| per tensor: NaN/inf stay
    if bool(torch.isfinite(torch.stack(peaks)).all()):
        return []
    return [key for key, t in flat.items() if not bool(torch.isfinite(t).all())]


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
    bad_dtypes, incomplete = [], []
    want = spec.config["dtype"]
    for name, parts in spec.tensors.items():
        missing = [r for r in cls.roles if r not in parts]
        if missing:
            incomplete.append(f"{name}: missing {missing}")
        bad_dtypes += [f"{name}.{role}: {t.dtype}" for role, t in parts.items() if t.dtype != want]
    if incomplete:
        raise CheckpointError(f"{path}: incomplete targets {incomplete}")
    if bad_dtypes:
        raise CheckpointError(f"{path}: tensors are not {want} as the metadata says: {bad_dtypes}")
    bad_values = non_finite(spec.tensors)
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


def check_model(spec: Spec, model: nn.Module) -> TargetLayout | None:
    """Raise listing missing / unexpected / mismatched targets; returns the stored selection's
    layout on ``model`` (``None`` for kinds whose targets are exactly the stored names)."""
    absent, mismatched = fit_problems(model, layer_shapes(spec), "file")
    unexpected = [f"{n} (no such linear layer)" for n in absent]
    missing, note, layout = [], "", None
    if spec.cls.selects_targets and not absent and not mismatched:
        try:
            layout = find_targets(model, spec.targets, spec.exclude, spec.layer_range)
            selected = layout.names
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
    return layout


def base_differences(spec: Spec, weights: Mapping[str, tuple]) -> list[str]:
    """Targets whose base weight (logical ``(d_out, d_in)`` orientation not needed: as stored)
    is not the one the file was made on: fingerprint mismatch (by the file's own method), or the
    kind's own test (:meth:`~modlora.kinds.AdapterKind.base_problem`, e.g. PiSSA's
    ``U_i^T W Vh_i = S_i``). Weights on the meta device are skipped with a warning.

    Args:
        spec: the parsed file.
        weights: ``{target: (stored weight, dense (d_out, d_in) view or None)}``.
    """
    fingerprint = FINGERPRINTS[spec.base_method]
    differ = []
    for name, (stored, dense) in weights.items():
        if stored.device.type == "meta":
            logger.warning("cannot check the base weight of {}: it is on meta", name)
            continue
        expected = spec.fingerprints.get(name)
        if expected is not None and fingerprint(stored) != expected:
            differ.append(name)
            continue
        if dense is not None and dense.dim() == 2 and name in spec.tensors:
            problem = spec.cls.base_problem(spec.config, name, spec.tensors[name], dense)
            if problem is not None:
                differ.append(f"{name} ({problem})")
    return differ


def report_base(spec: Spec, differ: list[str], policy: BaseCheck, base: str) -> None:
    """Raise (``policy="raise"``) or warn about ``differ`` from :func:`base_differences`."""
    if not differ or policy == "ignore":
        return
    msg = (
        f"checkpoint {spec.path} was made on a different base model: {len(differ)} target "
        f"weight(s) of {base} differ from the ones it was computed on: {differ[:8]}"
        f"{'...' if len(differ) > 8 else ''}"
    )
    if policy == "raise":
        raise CheckpointError(
            msg + " (pass check_base='warn' or 'ignore' if this base is intended)"
        )
    logger.warning("{}", msg)


def check_base(spec: Spec, model: nn.Module, policy: BaseCheck) -> None:
    """Compare the model's base weights (before any merge still in place) with the file's."""
    if policy == "ignore":
        return
    weights = {}
    resolved = resolve_targets(model, list(spec.tensors))
    for name in spec.tensors:
        target = resolved[name]
        stored = base_weight(model, name, target.weight)
        dense = None
        if not (target.quantized or stored.device.type == "meta"):
            dense = target.logical(stored)  # (d_out, d_in), or (E, d_out, d_in) for experts
        weights[name] = (stored, dense)
    report_base(spec, base_differences(spec, weights), policy, f"this {type(model).__name__}")
