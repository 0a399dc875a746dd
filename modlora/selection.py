"""How PiSSA picks its directions: singular decomposition and the selection scores.

Selection scores (``W = U diag(S) Vh``, ``X`` the calibration inputs, see DESIGN.md):

========================  ============================================  =================
``s_only``                ``S_i``                                       nothing
``act_only``              ``mean_n |X_n · Vh_i|``                       calibration
``wanda``                 ``S_i · mean_n |X_n · Vh_i|``                 calibration
``cho_rej_min_std``       ``min(std(X_cho · Vh_i), std(X_rej · Vh_i))``  chosen/rejected
========================  ============================================  =================
"""

from collections.abc import Mapping
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .calibration import RunningStats, stats_key

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


def check_calibrated(layout, calibration, score: str) -> None:
    """Every target (every expert) is calibrated, and has rows in the splits ``score`` reads.

    Raises:
        KeyError: a target (expert) has no statistics.
        ValueError: a target saw none of the calibration rows — typically an expert the router
            sent no calibration token to; the message lists them.
    """
    needs = {"act_only": ("all",), "wanda": ("all",), "cho_rej_min_std": ("chosen", "rejected")}
    # a split never collected at all keeps its own message (direction_scores)
    splits = [split for split in needs.get(score, ()) if calibration.tokens(split) > 0]
    empty = []
    for t in layout:
        for e in range(t.experts) if t.experts else [None]:
            stats = calibration.for_target(t.name, e)
            if any(split in stats and stats[split].count == 0 for split in splits):
                empty.append(stats_key(t.name, e))
    if empty:
        raise ValueError(
            f"selection_score={score!r} ranks directions by the calibration rows each target "
            f"saw, but {len(empty)} target(s) saw none (experts the router sent no calibration "
            f"token to): {empty[:8]}{'...' if len(empty) > 8 else ''}; calibrate on more "
            "tokens, exclude them, or use selection_score='s_only'"
        )
