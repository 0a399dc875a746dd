"""A re-implementation of the seed code's checkpoint writer, to build legacy fixtures in tests.

The seed format (DESIGN.md, "Legacy (seed) checkpoint format"): one safetensors file; tensor keys
``<role>.<module name with "." replaced by "__">``; str → str metadata written with ``str()``,
lists comma-joined, ``layer_range`` as ``"lo,hi"``, the user's keys merged in at top level.

- LoRA: ``A.<…> (r, d_in)`` and ``B.<…> (d_out, r)`` (the raw factors, ``ΔW = c·alpha/r·B@A``);
  metadata ``r``, ``alpha``, ``targets``, ``layer_range``.
- PiSSA: ``U.<…> (d_out, r)``, ``S.<…> (r,)``, ``Vh.<…> (r, d_in)``, ``delta_s.<…> (r,)``;
  metadata ``kind=pissa``, ``r``, ``targets``, ``layer_range``, ``selection_score``.

The seed wrote no format version, dtype, exclusions, dropout or fingerprints; its default
exclusions were ``("vision_tower", "lm_head")`` and its full depth band ``0.0,1.0``.
"""

from collections.abc import Mapping, Sequence

import safetensors.torch
from torch import Tensor


def flat(name: str) -> str:
    """The seed's tensor-key spelling of a module name."""
    return name.replace(".", "__")


def _meta(base: dict, extra_meta: Mapping | None) -> dict[str, str]:
    meta = {k: str(v) for k, v in base.items()}
    meta.update({str(k): str(v) for k, v in (extra_meta or {}).items()})
    return meta


def _band(layer_range) -> str:
    lo, hi = layer_range if layer_range is not None else (0.0, 1.0)
    return f"{lo},{hi}"


def save_legacy_lora(
    path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    r: int,
    alpha: float,
    targets: Sequence[str],
    layer_range=None,
    extra_meta: Mapping | None = None,
) -> None:
    """Write ``{module name: (A (r, d_in), B (d_out, r))}`` the way the seed's LoRA did."""
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"A.{flat(name)}"] = a.detach().cpu().contiguous()
        tensors[f"B.{flat(name)}"] = b.detach().cpu().contiguous()
    meta = {"r": r, "alpha": alpha, "targets": ",".join(targets), "layer_range": _band(layer_range)}
    safetensors.torch.save_file(tensors, str(path), metadata=_meta(meta, extra_meta))


def save_legacy_pissa(
    path,
    factors: Mapping[str, tuple[Tensor, Tensor, Tensor, Tensor]],
    r: int,
    targets: Sequence[str],
    layer_range=None,
    selection_score: str = "s_only",
    extra_meta: Mapping | None = None,
) -> None:
    """Write ``{module name: (U, S, Vh, delta_s)}`` the way the seed's PiSSA did."""
    tensors = {}
    for name, (u, s, vh, ds) in factors.items():
        for role, t in (("U", u), ("S", s), ("Vh", vh), ("delta_s", ds)):
            tensors[f"{role}.{flat(name)}"] = t.detach().cpu().contiguous()
    meta = {
        "kind": "pissa",
        "r": r,
        "targets": ",".join(targets),
        "layer_range": _band(layer_range),
        "selection_score": selection_score,
    }
    safetensors.torch.save_file(tensors, str(path), metadata=_meta(meta, extra_meta))


def lora_factors(lora) -> dict[str, tuple[Tensor, Tensor]]:
    """The raw ``(A, B)`` of a :class:`~modlora.ModulatedLoRA` (what the seed stored)."""
    return {n: (t["lora_A"], t["lora_B"]) for n, t in lora.target_tensors().items()}


def pissa_factors(pissa) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(U, S, Vh, delta_s)`` of a :class:`~modlora.ModulatedPiSSA` (what the seed stored)."""
    return {
        n: tuple(t[role].detach() for role in ("U", "S", "Vh", "delta_s"))
        for n, t in pissa.target_tensors().items()
    }
