"""``ModulatedPiSSA``: ``ΔW(c) = U · diag(c · delta_s) · Vh`` on r selected singular directions of W.

Non-destructive form: ``W`` is never modified (the seed's ``W_res + U diag(S + cΔs) Vh`` is the same
function). ``c = 0`` is the exact base; rounds can be loaded in any order. How directions are
scored and picked lives in :mod:`modlora.selection`.
"""

from collections.abc import Mapping, Sequence

import torch
from loguru import logger
from torch import Tensor, nn

from . import checks
from .adapter import LowRankAdapter
from .blocks import DEFAULT_EXCLUDE, LayerRange
from .calibration import Calibration
from .fit import factor_problems, require_dense
from .kinds import register_kind
from .layout import TargetLayout, selected
from .part import TargetPart, freeze_base
from .ranks import check_rank_vector
from .selection import (
    SELECTION_SCORES,
    SelectionScore,
    SvdMethod,
    check_calibrated,
    direction_scores,
    select_directions,
    tail_depth,
    top_singular,
)

BASE_RTOL = 1e-3
"""Base check: ``|U_i^T W Vh_i − S_i| <= 1e-3 · max(S)``. fp32 SVD round-off is ~1e-6 of
``max(S)``; another base (or a corrupted U / Vh) moves the projections by far more."""


def pissa_factors(u: Tensor, vh: Tensor, delta_s: Tensor) -> tuple[Tensor, Tensor, float]:
    """PiSSA's delta: ``A = Vh``, ``B = U · diag(delta_s)``, scale 1 (per expert when 3-D)."""
    return vh, u * delta_s.unsqueeze(-2), 1.0


class PiSSAPart(TargetPart):
    """Frozen ``U (d_out, r)``, ``S (r,)``, ``Vh (r, d_in)`` and the trainable ``delta_s (r,)``
    (with a leading expert axis ``E`` for fused experts)."""

    def __init__(self, name: str, u: Tensor, s: Tensor, vh: Tensor, delta_s_init: float) -> None:
        super().__init__(name)
        self.register_buffer("U", u.contiguous())
        self.register_buffer("S", s.contiguous())
        self.register_buffer("Vh", vh.contiguous())
        self.delta_s = nn.Parameter(torch.full_like(self.S, delta_s_init))

    def factors(self) -> tuple[Tensor, Tensor, float]:
        return pissa_factors(self.U, self.Vh, self.delta_s)


@register_kind
class ModulatedPiSSA(LowRankAdapter):
    """PiSSA on selected singular directions, scaled at run time by ``c``.

    Args:
        model: the model to adapt (frozen; its weights are read, never written).
        r: directions per target, clamped to ``min(d_in, d_out)`` per target.
        selection_score: ``s_only`` | ``act_only`` | ``wanda`` | ``cho_rej_min_std``.
        calibration: from :func:`~modlora.collect_calibration`; needed by all scores but
            ``s_only``.
        targets, exclude, layer_range: see :func:`~modlora.find_targets`; ``targets`` may be a
            :class:`~modlora.TargetLayout` already made.
        delta_s_init: initial ``delta_s`` (a constant; 0 makes the adapter a no-op at any ``c``).
        svd: ``auto`` | ``full`` | ``randomized`` (randomized only for ``s_only``).
        dtype: dtype of the factors (``delta_s`` and the hooks' math).
        factors: stored singular factors ``{target: (U (d_out, r_t), S (r_t,), Vh (r_t, d_in))}``
            to use instead of computing the SVD (how a checkpoint is rebuilt); the targets
            selected must be exactly its keys.

    Attributes:
        tail_depth: the tail-depth diagnostic averaged over targets (0 = top of S).
        selected: ``{target: indices of the kept directions}``.
    """

    kind = "pissa"
    roles = ("U", "S", "Vh", "delta_s")
    factor_roles = ("Vh", "U")
    config_keys = ("r", "selection_score", "delta_s_init")
    optional_keys = ("selected", "tail_depth")
    base_check = "raise"  # U, S, Vh are the SVD of that very base

    def __init__(
        self,
        model: nn.Module,
        r: int = 16,
        selection_score: SelectionScore = "s_only",
        calibration: Calibration | None = None,
        targets: Sequence[str] | str | TargetLayout = ("all-linear",),
        exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
        layer_range: LayerRange | None = None,
        delta_s_init: float | int = 0.0,
        svd: SvdMethod = "auto",
        dtype: torch.dtype = torch.float32,
        *,
        factors: Mapping[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> None:
        config = self._checked(r, selection_score, delta_s_init, dtype)
        checks.one_of(svd, ("auto", "full", "randomized"), "svd")
        score = config["selection_score"]
        if factors is None and score != "s_only" and calibration is None:
            raise ValueError(
                f"selection_score={score!r} needs calibration=collect_calibration(...)"
            )
        if svd == "randomized" and score != "s_only":
            raise ValueError("svd='randomized' only applies to selection_score='s_only'")
        layout = selected(model, targets, exclude, layer_range)
        if factors is None:
            require_dense(layout, "PiSSA's SVD (or use LoRA)")
            if calibration is not None:
                check_calibrated(layout, calibration, score)
        else:
            _check_factor_keys(model, layout, factors)
        super().__init__(model, layout)
        self.r, self.selection_score = config["r"], score
        self.delta_s_init, self.dtype = config["delta_s_init"], config["dtype"]
        self.selected: dict[str, Tensor] = {}
        self.tail_depth = float("nan")
        if factors is None:
            factors = self._decompose(calibration, svd)
        for t in layout:
            u, s, vh = (f.to(t.device, self.dtype) for f in factors[t.name])
            self.add_part(PiSSAPart(t.name, u, s, vh, self.delta_s_init))
        freeze_base(model)

    @classmethod
    def from_factors(
        cls, model: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor, Tensor]], **kwargs
    ) -> "ModulatedPiSSA":
        """``ModulatedPiSSA(model, factors=factors, **kwargs)``: from stored singular factors."""
        return cls(model, factors=factors, **kwargs)

    @staticmethod
    def _checked(r, selection_score, delta_s_init, dtype) -> dict:
        return {
            "r": checks.positive_int(r, "r"),
            "selection_score": checks.one_of(selection_score, SELECTION_SCORES, "selection_score"),
            "delta_s_init": checks.number(delta_s_init, "delta_s_init"),
            "dtype": checks.float_dtype(dtype, "dtype"),
        }

    @torch.no_grad()
    def _decompose(self, calibration: Calibration | None, svd: SvdMethod) -> dict:
        """``{target: (U, S, Vh)}`` of the selected directions; fills ``selected``, ``tail_depth``."""
        out, depths = {}, []
        score = self.selection_score
        method = svd if score == "s_only" else "full"
        for target in self.layout:
            k = min(target.d_in, target.d_out)
            rank = min(self.r, k)
            weight = target.dense_weight().detach()  # ([E,] d_out, d_in)
            picks = []
            for e, w in enumerate(weight.unbind(0) if target.experts else [weight]):
                u, s, vh = top_singular(w, rank, method)
                if score == "s_only":
                    idx = torch.arange(rank, device=s.device)
                else:
                    stats = calibration.for_target(target.name, e if target.experts else None)
                    idx = select_directions(direction_scores(score, s, vh, stats), rank)
                depths.append(tail_depth(idx.cpu(), k))
                picks.append((u[:, idx], s[idx], vh[idx], idx.cpu()))
            u, s, vh, idx = (
                torch.stack(x) if target.experts else x[0] for x in zip(*picks, strict=True)
            )
            self.selected[target.name] = idx  # ([E,] r)
            out[target.name] = (u, s, vh)
        self.tail_depth = sum(depths) / len(depths)
        logger.info(
            "PiSSA r={} score={} on {} targets: tail depth {:.4f} (0 = top of S)",
            self.r,
            score,
            len(self.layout),
            self.tail_depth,
        )
        return out

    def singular_factors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (d_out, r), S (r,), Vh (r, d_in))`` kept for ``name``."""
        part = self.part(name)
        return part.U, part.S, part.Vh

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``delta_s = delta_s_init`` on every target."""
        for _, part in self.named_parts():
            part.delta_s.fill_(self.delta_s_init)
            part.pending_init = False

    # ------------------------------------------------------------------ kind protocol
    def config(self) -> dict:
        depth = self.tail_depth
        return {
            "r": self.r,
            "selection_score": self.selection_score,
            "delta_s_init": self.delta_s_init,
            "selected": {k: v.tolist() for k, v in self.selected.items()},
            "tail_depth": depth if depth == depth else None,  # NaN (unknown) is stored as null
        }

    @classmethod
    def parse_config(cls, meta: dict) -> dict:
        config = cls._checked(
            meta.get("r"), meta.get("selection_score"), meta.get("delta_s_init"), meta.get("dtype")
        )
        selected = meta.get("selected") or {}
        if not isinstance(selected, dict) or not all(_indices(v) for v in selected.values()):
            raise checks.invalid(
                ValueError,
                "selected",
                f"selected must be {{target: [int, ...] or [[int, ...] per expert]}}, got {selected!r}",
            )
        depth = meta.get("tail_depth")
        config["selected"] = {k: torch.tensor(v, dtype=torch.long) for k, v in selected.items()}
        config["tail_depth"] = float("nan") if depth is None else checks.number(depth, "tail_depth")
        return config

    @classmethod
    def target_factors(cls, config: dict, name: str, tensors: dict) -> tuple[Tensor, Tensor, float]:
        return pissa_factors(tensors["U"], tensors["Vh"], tensors["delta_s"])

    @classmethod
    def check_target(cls, config: dict, name: str, tensors: dict, rank: int) -> None:
        if rank > config["r"]:
            raise ValueError(
                f"target {name!r}: U {tuple(tensors['U'].shape)}, Vh {tuple(tensors['Vh'].shape)}"
                f": r={rank} exceeds the metadata r={config['r']}"
            )
        experts = tensors["Vh"].shape[0] if tensors["Vh"].dim() == 3 else None
        check_rank_vector(name, "S", tensors["S"], rank, experts)
        check_rank_vector(name, "delta_s", tensors["delta_s"], rank, experts)

    @classmethod
    @torch.no_grad()
    def base_problem(cls, config: dict, name: str, tensors: dict, weight: Tensor) -> str | None:
        """``U_i^T W Vh_i = S_i`` within ``BASE_RTOL · max(S)``: U, S, Vh are this W's SVD.

        Factors stored in a coarser dtype than float32 (an adapter built with
        ``dtype=torch.bfloat16``, or cast with ``.half()``) carry its rounding: the tolerance is
        at least twice that dtype's epsilon (bf16: measured ≤ 0.0034 · max(S) up to d = 2048).
        """
        rtol = max(BASE_RTOL, 2 * torch.finfo(tensors["U"].dtype).eps)
        u, s, vh = (tensors[k].to(weight.device, torch.float32) for k in ("U", "S", "Vh"))
        proj = ((u.T @ weight.float()) * vh).sum(dim=1)  # (r,) = U_i^T W Vh_i
        err = float((proj - s).abs().max())
        bad = err > rtol * float(s.abs().max())
        return f"U, S, Vh are not its SVD: |U^T W Vh - S| = {err:.3g}" if bad else None

    @classmethod
    def rebuild(cls, model, layout, config, tensors) -> "ModulatedPiSSA":
        self = cls(
            model,
            r=config["r"],
            selection_score=config["selection_score"],
            targets=layout,
            delta_s_init=config["delta_s_init"],
            dtype=config["dtype"],
            factors={n: (t["U"], t["S"], t["Vh"]) for n, t in tensors.items()},
        )
        self.load_target_tensors(tensors)
        self.selected = dict(config["selected"])
        self.tail_depth = config["tail_depth"]
        return self


def _indices(value) -> bool:
    """A list of ints, or a list of lists of ints (one per expert)."""

    def ints(v) -> bool:
        return isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v
        )

    return ints(value) or (isinstance(value, list) and bool(value) and all(ints(v) for v in value))


def _check_factor_keys(model, layout, factors: Mapping[str, tuple[Tensor, Tensor, Tensor]]) -> None:
    missing = sorted(set(layout.names) - set(factors))
    unexpected = sorted(set(factors) - set(layout.names))
    problems = factor_problems(
        model, {n: (vh, u) for n, (u, _, vh) in factors.items()}, ("Vh", "U")
    )
    for name, (_, s, vh) in factors.items():
        try:
            check_rank_vector(name, "S", s, vh.shape[-2], vh.shape[0] if vh.dim() == 3 else None)
        except ValueError as err:
            problems.append(str(err))
    if missing or unexpected or problems:
        raise ValueError(
            f"PiSSA factors do not fit this model: missing targets {missing}, "
            f"unexpected targets {unexpected}, problems {problems}"
        )
