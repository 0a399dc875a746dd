"""Case 4: PiSSA ``s_only`` construction — randomized vs full SVD, and the chosen subspaces' agreement.

Weights. Random weights have a flat Marchenko–Pastur spectrum that nothing trained looks like, so
the benchmark weights are ``W = U · diag(s) · Vᵀ`` with random orthonormal ``U``, ``V`` and ``s``
the singular-value profile of the real all-MiniLM-L6-v2: every encoder linear layer's spectrum,
normalised by its top value, resampled to a common length and averaged, then resampled to
``min(d_out, d_in)`` values. That profile is flat at the top (``σ_16 / σ_17 ≈ 1.01``), which is
what makes the top-16 subspace hard to pin down.

Agreement: the mean squared cosine of the principal angles between the randomized and the full
SVD's top-``r`` subspaces, ``‖Q_1ᵀ Q_2‖_F² / r``, for the left (``U``) and the right (``Vh``)
singular vectors; 1 means the same subspace.
"""

import torch
import torch.nn.functional as F
from torch import nn

from modlora.pissa import top_singular

from .common import Case, interleave, paired_ratio, summarize


def spectrum_profile(model: nn.Module, points: int = 385) -> torch.Tensor:
    """Mean normalised singular-value profile of ``model``'s linear layers, ``(points,)``."""
    profiles = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and min(module.weight.shape) >= 64:
                s = torch.linalg.svdvals(module.weight.float())
                s = F.interpolate(
                    (s / s[0])[None, None], size=points, mode="linear"
                )  # (1, 1, points)
                profiles.append(s[0, 0])
    return torch.stack(profiles).mean(0)


def realistic_weight(d_out: int, d_in: int, profile: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with ``s`` the resampled ``profile``, ``(d_out, d_in)`` float32."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    s = F.interpolate(profile[None, None], size=k, mode="linear")[0, 0]  # (k,)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g))  # (d_out, k)
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g))  # (d_in, k)
    return (u * s) @ v.T


def subspace_agreement(q1: torch.Tensor, q2: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between two orthonormal column bases."""
    r = q1.shape[1]
    return float((q1.T @ q2).pow(2).sum() / r)


def pissa_svd_case(model: nn.Module, shapes, r: int, repeats: int, clock: str) -> dict:
    profile = spectrum_profile(model)
    out = {
        "r": r,
        "weights": "U diag(s) V^T, s = mean normalised singular-value profile of "
        "all-MiniLM-L6-v2's linear layers",
        "profile_sigma_r_over_sigma_r_plus_1": None,
        "shapes": {},
    }
    for d_out, d_in in shapes:
        w = realistic_weight(d_out, d_in, profile)
        u_f, s_f, vh_f = top_singular(w, r, "full")
        u_r, s_r, vh_r = top_singular(w, r, "randomized")
        key = f"{d_out}x{d_in}"
        cases = {
            "full": Case(lambda w=w: top_singular(w, r, "full")),
            "randomized": Case(lambda w=w: top_singular(w, r, "randomized")),
        }
        samples = interleave(cases, repeats, warmup=0)
        out["profile_sigma_r_over_sigma_r_plus_1"] = float(s_f[r - 1] / s_f[r])
        out["shapes"][key] = {
            "cases": summarize(samples, "full", clock),
            "speedup_randomized_vs_full": 1.0 / paired_ratio(samples, "randomized", "full", clock),
            "agreement_u": subspace_agreement(u_f[:, :r], u_r),
            "agreement_vh": subspace_agreement(vh_f[:r].T, vh_r.T),
            "max_rel_error_s": float(((s_r - s_f[:r]).abs() / s_f[:r]).max()),
        }
    return out
