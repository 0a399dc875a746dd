"""The seed's legacy checkpoint format: detection and parsing into a :class:`~.spec.Spec`.

Legacy (seed) files: LoRA ``A.<name with . as __> (r, d_in)`` / ``B.<…> (d_out, r)`` with
metadata ``r``, ``alpha``, ``targets`` (comma-separated), ``layer_range`` (``"lo,hi"``) and user
keys (kept as ``extra_meta``); PiSSA ``U./S./Vh./delta_s.<…>`` with ``kind=pissa`` and
``selection_score``. The target set is rebuilt from the tensor keys (matched against the model's
module names); a disagreement with ``targets`` / ``layer_range`` / the old default exclusions is
logged as a warning. Legacy PiSSA files carry no fingerprint: the base check
(:mod:`modlora.checkpoint.validate`) verifies instead that ``U_i^T W Vh_i = S_i`` on every target.
"""

import math
import re
from collections.abc import Sequence

from loguru import logger
from torch import Tensor

from ..kinds import kind_class
from .io import CheckpointError, StoredFile
from .spec import Spec, kind_config, need

LEGACY_EXCLUDE = ("vision_tower", "lm_head")
LEGACY_ROLES = {
    "lora": {"A": "lora_A", "B": "lora_B"},
    "pissa": {"U": "U", "S": "S", "Vh": "Vh", "delta_s": "delta_s"},
}
"""The seed's tensor prefixes per kind, and the v1 role each one is."""
_LEGACY_KEYS = ("r", "alpha", "targets", "layer_range", "kind", "selection_score")


def is_legacy(file: StoredFile) -> bool:
    return has_legacy_keys(file.tensors)


def has_legacy_keys(keys) -> bool:
    """Every tensor key is a seed role prefix (``A.``, ``B.``, ``U.``…) plus a module name."""
    prefixes = tuple(f"{role}." for roles in LEGACY_ROLES.values() for role in roles)
    keys = list(keys)
    return bool(keys) and all(k.startswith(prefixes) for k in keys)


def parse_legacy(file: StoredFile, names: Sequence[str] | None) -> Spec:
    """The :class:`Spec` of a seed file.

    Args:
        file: the file read.
        names: the model's module names (undo the ``__`` flattening, check the selection);
            ``None``: no model (``__`` becomes ``.``; nothing is checked against a model).
    """
    meta, path = file.metadata, file.path
    kind = meta.get("kind", "lora")
    if kind not in LEGACY_ROLES:
        raise CheckpointError(
            f"{path}: unknown adapter kind {kind!r} in a legacy file; known {sorted(LEGACY_ROLES)}"
        )
    roles = LEGACY_ROLES[kind]
    by_flat = {n.replace(".", "__"): n for n in names or () if n}
    tensors: dict[str, dict[str, Tensor]] = {}
    unknown, foreign = [], []
    for key, tensor in file.tensors.items():
        role, _, flat = key.partition(".")
        if role not in roles or not flat:
            unknown.append(key)
        elif names is not None and flat not in by_flat:
            foreign.append(flat.replace("__", "."))
        else:
            name = by_flat.get(flat, flat.replace("__", "."))
            tensors.setdefault(name, {})[roles[role]] = tensor
    if unknown:
        raise CheckpointError(
            f"{path}: legacy {kind} file has unexpected tensor keys {sorted(unknown)[:10]} "
            f"(expected roles {tuple(roles)})"
        )
    if foreign:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: unexpected targets "
            f"{sorted(set(foreign))} (no such module)"
        )
    dtypes = {t.dtype for t in file.tensors.values()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtype is None or not dtype.is_floating_point:
        raise CheckpointError(f"{path}: legacy tensors must share one float dtype, got {dtypes}")
    if "r" not in meta:
        raise CheckpointError(f"{path}: metadata key 'r' is missing")
    need(re.fullmatch(r"\d+", meta["r"]) is not None, path, "r", "a positive int", meta["r"])
    if kind == "lora" and "alpha" not in meta:
        raise CheckpointError(f"{path}: metadata key 'alpha' is missing")
    try:
        alpha = float(meta.get("alpha", "nan"))
    except ValueError:
        alpha = float("nan")
    config = {
        "r": int(meta["r"]),
        "alpha": alpha,
        "dropout": 0.0,
        "init": "zero",
        "dtype": dtype,
        "rank_pattern": {},
        "alpha_pattern": {},
        "selection_score": meta.get("selection_score", "s_only"),
        "delta_s_init": 0.0,
    }
    cls = kind_class(kind)
    order = [n for n in names if n in tensors] if names is not None else sorted(tensors)
    if names is not None:
        _check_legacy_selection(meta, order, names, path)
    return Spec(
        path=path,
        kind=kind,
        cls=cls,
        legacy=True,
        config=kind_config(cls, {k: config[k] for k in ("dtype", *cls.config_keys)}, path),
        tensors={n: tensors[n] for n in order},
        identity=file.identity,
        targets=tuple("^" + re.escape(n) + "$" for n in order),  # exactly the stored targets
        exclude=(),
        extra_meta={k: v for k, v in meta.items() if k not in _LEGACY_KEYS},
    )


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


def _check_legacy_selection(meta: dict, names: list[str], modules: Sequence[str], path) -> None:
    """Warn where the tensor keys disagree with the legacy targets / layer_range / exclusions.

    Warnings, not errors: the seed's exact matching and rounding rules are not recorded, and the
    tensor keys say exactly which layers were adapted. Fractional bands allow every rounding.
    """
    patterns = [p.strip() for p in meta.get("targets", "").split(",") if p.strip()]
    band = _parse_legacy_range(meta.get("layer_range"), path)
    block = re.compile(r"\.layers\.(\d+)\.")
    indices = [int(m.group(1)) for n in modules if (m := block.search(n + "."))]
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
