"""What a merge writes and how it is verified, shared by the live and the offline merge.

:func:`merged_weight` accumulates ``W + B @ A`` in float32 and casts once; :func:`check_merged`
compares a merged layer's output with the base output plus the hook's delta on probe rows,
allowing for the weight dtype's rounding noise. :class:`MergeError` and :class:`MergeReport`
are what both merges raise and return.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

PROBE_ROWS = 4
"""Rows of the random probe input each merged layer is checked on."""
PROBE_SEED = 0
NOISE_SIGMAS = 4.0
"""Allowance, in units of the dtype's expected rounding noise (see :func:`check_merged`)."""


class MergeError(RuntimeError):
    """A target could not be merged; the model (or output folder) was left as it was.

    Attributes:
        target: the target's name.
        reason: what went wrong.
    """

    def __init__(self, target: str, reason: str, detail: str = "") -> None:
        self.target, self.reason = target, reason
        super().__init__(f"cannot merge target {target!r}: {reason}{detail}")


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge` did.

    Attributes:
        kind: the adapter kind (``lora``, ``pissa``, ``history``...).
        c: the coefficient merged.
        attempted: targets the adapter has.
        applied: targets merged (equal to ``attempted``: anything else raises).
        worst_rel_error: largest ``‖merged − hooked‖ / ‖hooked delta‖`` on the probe inputs
            (0 where the delta is exactly zero).
        worst_target: the target with that error (``None`` if every delta is zero).
        below_resolution: targets whose delta is nonzero but below the weight dtype's rounding
            noise on the probe: merged as well as the dtype allows, yet barely visible.
        targets: the merged targets, in order.
    """

    kind: str
    c: float
    attempted: int
    applied: int
    worst_rel_error: float
    worst_target: str | None
    below_resolution: tuple[str, ...]
    targets: tuple[str, ...]


def probe_input(d_in: int, device, dtype: torch.dtype) -> Float[Tensor, "n d_in"]:
    """The fixed random rows every merged layer is checked on (``PROBE_ROWS`` × ``d_in``)."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(PROBE_ROWS, d_in, generator=gen).to(device, dtype)


def merged_weight(
    weight: Float[Tensor, "*experts d_out d_in"],
    a: Float[Tensor, "*experts r d_in"],
    b: Float[Tensor, "*experts d_out r"],
) -> Float[Tensor, "*experts d_out d_in"]:
    """``W + B @ A`` accumulated in float32, cast once to ``W``'s dtype (a new tensor)."""
    if weight.dim() == 3:  # fused experts: (E, d_out, d_in) + (E, d_out, r) @ (E, r, d_in)
        return torch.baddbmm(weight.float(), b.float(), a.float()).to(weight.dtype)
    return torch.addmm(weight.float(), b.float(), a.float()).to(weight.dtype)


def check_merged(
    name: str,
    y_base: Float[Tensor, "n d_out"],
    y_merged: Float[Tensor, "n d_out"],
    delta: Float[Tensor, "n d_out"],
    col_norms: Float[Tensor, " d_in"],
    x: Float[Tensor, "n d_in"],
    dtype: torch.dtype,
    rtol: float,
) -> tuple[float, bool]:
    """Compare a merged layer's output with ``base output + hooked delta`` on probe rows ``x``.

    The allowance is ``rtol · ‖δ‖`` plus ``NOISE_SIGMAS`` times the rounding noise expected from
    storing the weight in ``dtype``: ``eps(dtype) · (‖y‖ + ‖s‖) + eps(fp32) · sqrt(d_in) · ‖s‖``
    with ``‖s‖² = Σ_j ‖x_{:,j}‖² ‖W_{:,j}‖²`` (the root-sum-square size of the products).

    Returns:
        ``(relative error ‖merged − ref‖ / ‖δ‖ (0 if δ = 0), δ below the noise floor)``.

    Raises:
        MergeError: the difference exceeds the allowance (a verification miss).
    """
    y_ref = y_base + delta
    err = float(torch.linalg.vector_norm(y_merged - y_ref))
    size = float(torch.linalg.vector_norm(delta))
    s = float(torch.sqrt((x.float().square().sum(0) * col_norms.square()).sum()))
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    noise = eps * (float(torch.linalg.vector_norm(y_base)) + s) + eps32 * math.sqrt(x.shape[-1]) * s
    allowed = rtol * size + NOISE_SIGMAS * noise
    if not math.isfinite(err) or err > allowed:
        raise MergeError(
            name,
            "verification miss: the merged layer does not reproduce the hooked forward",
            f" (‖merged − hooked‖ = {err:.3e}, ‖delta‖ = {size:.3e}, allowed {allowed:.3e})",
        )
    rel = err / size if size > 0 else 0.0
    return rel, 0 < size <= NOISE_SIGMAS * noise
