"""``ModulatedPiSSA``: ``ΔW(c) = U · diag(c · delta_s) · Vh`` on r selected singular directions of W.

Non-destructive form: ``W`` is never modified (the seed's ``W_res + U diag(S + cΔs) Vh`` is the same
function). ``c = 0`` is the exact base; rounds can be loaded in any order.

Selection scores (``W = U diag(S) Vh``, ``X`` the calibration inputs, see DESIGN.md):

========================  ============================================  =================
``s_only``                ``S_i``                                       nothing
``act_only``              ``mean_n |X_n · Vh_i|``                       calibration
``wanda``                 ``S_i · mean_n |X_n · Vh_i|``                 calibration
``cho_rej_min_std``       ``min(std(X_cho · Vh_i), std(X_rej · Vh_i))``  chosen/rejected
========================  ============================================  =================
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
from jaxtyping import Float, Int
from loguru import logger
from torch import Tensor, nn

from .calibration import Calibration, RunningStats
from .hooks import LowRankAdapter, check_state_dict
from .layout import DEFAULT_EXCLUDE, LayerRange, Target, find_targets
from .lora import _check_positive_int

SelectionScore = Literal["s_only", "act_only", "wanda", "cho_rej_min_std"]
SELECTION_SCORES = ("s_only", "act_only", "wanda", "cho_rej_min_std")
SvdMethod = Literal["auto", "full", "randomized"]


def direction_scores(
    score: SelectionScore,
    s: Float[Tensor, " k"],
    vh: Float[Tensor, "k d_in"],
    stats: Mapping[str, RunningStats] | None,
) -> Float[Tensor, " k"]:
    """The score of every singular direction, as DESIGN.md defines it."""
    if score == "s_only":
        return s
    if stats is None:
        raise ValueError(f"selection_score={score!r} needs calibration (collect_calibration)")
    if score in ("act_only", "wanda"):
        act = stats["all"].mean_abs_projection(vh).to(s.device)
        return act if score == "act_only" else s * act
    if score == "cho_rej_min_std":
        if stats["chosen"].count == 0 or stats["rejected"].count == 0:
            raise ValueError(
                "selection_score='cho_rej_min_std' needs calibration with a chosen/rejected split "
                "(collect_calibration(..., batches=chosen, rejected=rejected))"
            )
        cho = stats["chosen"].projected_std(vh).to(s.device)
        rej = stats["rejected"].projected_std(vh).to(s.device)
        return torch.minimum(cho, rej)
    raise ValueError(f"unknown selection_score {score!r}; choose from {SELECTION_SCORES}")


def select_directions(scores: Float[Tensor, " k"], r: int) -> Int[Tensor, " r"]:
    """Indices of the top-``r`` scores, sorted ascending (ties keep the larger singular value)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:r].sort().values


def tail_depth(chosen: Int[Tensor, " r"], k: int) -> float:
    """``(mean(chosen) − (r − 1)/2) / max(1, k − r)``: 0 when the picks are the top of S."""
    r = chosen.numel()
    return float((chosen.double().mean() - (r - 1) / 2) / max(1, k - r))


def top_singular(
    weight: Float[Tensor, "d_out d_in"], r: int, method: SvdMethod = "auto", niter: int = 6
) -> tuple[Float[Tensor, "d_out k"], Float[Tensor, " k"], Float[Tensor, "k d_in"]]:
    """fp32 SVD of ``weight``; with ``randomized`` only the top ``r`` directions are returned.

    ``auto`` takes the randomized path (``torch.svd_lowrank``, oversampled, ``niter`` power
    iterations) when ``r`` is at most a quarter of ``k = min(d_out, d_in)`` and ``k >= 256``.

    Randomized settings: ``q = 2r + 24`` columns and ``niter = 6`` power iterations. Trained
    weights have flat tops (all-MiniLM-L6-v2: ``σ_16 / σ_17 ≈ 1.01``), so the chosen subspace
    needs the extra columns: on 2048×2048 weights with that spectrum the mean squared cosine of
    the principal angles to the full SVD's top-16 subspace is ≈0.995 (with ``2r + 8``: ≈0.98),
    at ~25× less time than the full SVD (``python -m benchmarks.run``, case ``pissa_svd``).
    """
    w = weight.float()
    k = min(w.shape)
    if method == "auto":
        method = "randomized" if 4 * r <= k and k >= 256 else "full"  # small: full is cheaper
    if method == "full":
        return torch.linalg.svd(w, full_matrices=False)
    if method != "randomized":
        raise ValueError(f"svd must be 'auto', 'full' or 'randomized', got {method!r}")
    q = min(k, 2 * r + 24)  # oversampling for flat spectra: see the docstring
    u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
    return u[:, :r], s[:r], v[:, :r].T


class ModulatedPiSSA(LowRankAdapter):
    """PiSSA on selected singular directions, scaled at run time by ``c``.

    Args:
        model: the model to adapt (frozen; its weights are read, never written).
        r: directions per target, clamped to ``min(d_in, d_out)`` per target.
        selection_score: ``s_only`` | ``act_only`` | ``wanda`` | ``cho_rej_min_std``.
        calibration: from :func:`~modlora.collect_calibration`; needed by all scores but
            ``s_only``.
        targets, exclude, layer_range: see :func:`~modlora.find_targets`.
        delta_s_init: initial ``delta_s`` (a constant; 0 makes the adapter a no-op at any ``c``).
        svd: ``auto`` | ``full`` | ``randomized`` (randomized only for ``s_only``).
        dtype: dtype of the factors (``delta_s`` and the hooks' math).

    Attributes:
        tail_depth: the tail-depth diagnostic averaged over targets (0 = top of S).
        selected: ``{target: indices of the kept directions}``.
    """

    kind = "pissa"

    def __init__(
        self,
        model: nn.Module,
        r: int = 16,
        selection_score: SelectionScore = "s_only",
        calibration: Calibration | None = None,
        targets: Sequence[str] | str = ("all-linear",),
        exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
        layer_range: LayerRange | None = None,
        delta_s_init: float | int = 0.0,
        svd: SvdMethod = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        r = _check_positive_int(r, "r")
        if selection_score not in SELECTION_SCORES:
            raise ValueError(
                f"unknown selection_score {selection_score!r}; choose from {SELECTION_SCORES}"
            )
        if selection_score != "s_only" and calibration is None:
            raise ValueError(
                f"selection_score={selection_score!r} needs calibration=collect_calibration(...)"
            )
        if svd not in ("auto", "full", "randomized"):
            raise ValueError(f"svd must be 'auto', 'full' or 'randomized', got {svd!r}")
        if svd == "randomized" and selection_score != "s_only":
            raise ValueError("svd='randomized' only applies to selection_score='s_only'")
        if not isinstance(delta_s_init, int | float) or isinstance(delta_s_init, bool):
            raise ValueError(f"delta_s_init must be a number, got {delta_s_init!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        layout = find_targets(model, targets, exclude, layer_range)
        quantized = [t.name for t in layout if t.quantized]
        if quantized:
            raise TypeError(
                f"PiSSA needs the dense weight for its SVD; quantized target(s) {quantized[:5]}"
                f"{'...' if len(quantized) > 5 else ''} — load the base unquantized or use LoRA"
            )
        if calibration is not None:
            for t in layout:
                calibration.for_target(t.name)  # every target must be calibrated
        super().__init__(model, layout)
        self.r, self.selection_score, self.dtype = r, selection_score, dtype
        self.delta_s_init = float(delta_s_init)
        self._u: dict[str, Tensor] = {}
        self._s: dict[str, Tensor] = {}
        self._vh: dict[str, Tensor] = {}
        self._delta_s: dict[str, nn.Parameter] = {}
        self.selected: dict[str, Tensor] = {}
        depths = []
        for target in layout:
            k = min(target.d_in, target.d_out)
            rank = min(r, k)
            method = svd if selection_score == "s_only" else "full"
            with torch.no_grad():
                u, s, vh = top_singular(target.dense_weight().detach(), rank, method)
                if selection_score == "s_only":
                    idx = torch.arange(rank, device=s.device)
                else:
                    stats = calibration.for_target(target.name)
                    idx = select_directions(direction_scores(selection_score, s, vh, stats), rank)
            self.selected[target.name] = idx.cpu()
            depths.append(tail_depth(idx.cpu(), k))
            self._set_factors(target.name, u[:, idx], s[idx], vh[idx], dtype)
        self.tail_depth = sum(depths) / len(depths)
        logger.info(
            "PiSSA r={} score={} on {} targets: tail depth {:.4f} (0 = top of S)",
            r,
            selection_score,
            len(layout),
            self.tail_depth,
        )
        model.requires_grad_(False)

    @classmethod
    def from_factors(
        cls,
        model: nn.Module,
        factors: Mapping[str, tuple[Tensor, Tensor, Tensor]],
        r: int,
        selection_score: SelectionScore = "s_only",
        targets: Sequence[str] | str = ("all-linear",),
        exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
        layer_range: LayerRange | None = None,
        delta_s_init: float | int = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> "ModulatedPiSSA":
        """Rebuild from stored singular factors ``{target: (U (d_out, r_t), S (r_t,), Vh (r_t, d_in))}``.

        No SVD is run. The targets found with ``targets/exclude/layer_range`` must be exactly the
        keys of ``factors``, with matching shapes.

        Raises:
            ValueError: missing, unexpected or mis-shaped targets (all listed).
        """
        layout = find_targets(model, targets, exclude, layer_range)
        missing = sorted(set(layout.names) - set(factors))
        unexpected = sorted(set(factors) - set(layout.names))
        wrong = []
        for name, (u, s, vh) in factors.items():
            if name not in layout:
                continue
            t = layout[name]
            rank = s.shape[0] if s.dim() == 1 else -1
            if u.shape != (t.d_out, rank) or vh.shape != (rank, t.d_in):
                wrong.append(
                    f"{name}: U {tuple(u.shape)}, S {tuple(s.shape)}, Vh {tuple(vh.shape)} "
                    f"vs layer (d_out={t.d_out}, d_in={t.d_in})"
                )
        if missing or unexpected or wrong:
            raise ValueError(
                f"PiSSA factors do not fit this model: missing targets {missing}, "
                f"unexpected targets {unexpected}, shape mismatches {wrong}"
            )
        self = cls.__new__(cls)
        LowRankAdapter.__init__(self, model, layout)
        self.r, self.selection_score, self.dtype = r, selection_score, dtype
        self.delta_s_init = float(delta_s_init)
        self._u, self._s, self._vh, self._delta_s = {}, {}, {}, {}
        self.selected = {}
        self.tail_depth = float("nan")
        for target in layout:
            u, s, vh = factors[target.name]
            dev = target.device
            self._set_factors(target.name, u.to(dev), s.to(dev), vh.to(dev), dtype)
        model.requires_grad_(False)
        return self

    def _set_factors(self, name: str, u: Tensor, s: Tensor, vh: Tensor, dtype: torch.dtype) -> None:
        self._u[name] = u.to(dtype).contiguous()
        self._s[name] = s.to(dtype).contiguous()
        self._vh[name] = vh.to(dtype).contiguous()
        self._delta_s[name] = nn.Parameter(torch.full_like(self._s[name], self.delta_s_init))

    # ------------------------------------------------------------------ factors
    def hook_factors(self, target: Target) -> tuple[Tensor, Tensor, float]:
        u = self._u[target.name]
        return self._vh[target.name], u * self._delta_s[target.name], 1.0  # B = U diag(Δs)

    def ranks(self) -> dict[str, int]:
        """``{target name: rank}`` (``r`` clamped per target)."""
        return {name: s.shape[0] for name, s in self._s.items()}

    def singular_factors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (d_out, r), S (r,), Vh (r, d_in))`` kept for ``name``."""
        return self._u[name], self._s[name], self._vh[name]

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``("<target>.delta_s", delta_s)`` for every target."""
        for name, p in self._delta_s.items():
            yield f"{name}.delta_s", p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def state_dict(self) -> dict[str, Tensor]:
        """``delta_s`` and the singular factors (``.U``, ``.S``, ``.Vh``), detached copies."""
        out = {}
        for name in self._delta_s:
            out[f"{name}.U"] = self._u[name].clone()
            out[f"{name}.S"] = self._s[name].clone()
            out[f"{name}.Vh"] = self._vh[name].clone()
            out[f"{name}.delta_s"] = self._delta_s[name].detach().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load ``delta_s`` (required) and singular factors (optional) in place, strictly.

        Raises:
            KeyError: missing or unexpected keys.
            ValueError: a shape mismatch or non-finite values (the key is named).
        """
        current = self.state_dict()
        required = {k for k in current if k.endswith(".delta_s")}
        check_state_dict(state, current, required)
        stores = {"U": self._u, "S": self._s, "Vh": self._vh}
        for key, value in state.items():
            name, role = key.rsplit(".", 1)
            if role == "delta_s":
                self._delta_s[name].copy_(value)
            else:
                stores[role][name].copy_(value)
