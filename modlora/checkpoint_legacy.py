"""The seed's legacy checkpoint format: detection and parsing into a :class:`_Spec`.

Legacy (seed) files: LoRA ``A.<name with . as __> (r, d_in)`` / ``B.<…> (d_out, r)`` with
metadata ``r``, ``alpha``, ``targets`` (comma-separated), ``layer_range`` (``"lo,hi"``) and user
keys (kept as ``extra_meta``); PiSSA ``U./S./Vh./delta_s.<…>`` with ``kind=pissa`` and
``selection_score``. The target set is rebuilt from the tensor keys (matched against the model's
module names); a disagreement with ``targets`` / ``layer_range`` / the old default exclusions is
logged as a warning. Legacy PiSSA files carry no fingerprint: the base check
(:mod:`modlora.checkpoint_validate`) verifies instead that ``U_i^T W Vh_i = S_i`` on every target.
"""

import math
import re

from loguru import logger
from torch import Tensor, nn

from .checkpoint_io import CheckpointError, _File
from .checkpoint_spec import _need, _Spec
from .pissa import SELECTION_SCORES

LEGACY_EXCLUDE = ("vision_tower", "lm_head")
LEGACY_ROLES = {"lora": ("A", "B"), "pissa": ("U", "S", "Vh", "delta_s")}
_LEGACY_KEYS = ("r", "alpha", "targets", "layer_range", "kind", "selection_score")


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
