"""Per-item statistics and their bootstrap intervals.

Every number the evaluation reports is a ratio of sums over items (sentences or pairs): a mean
is ``(values, ones)``, a flip rate ``(flipped, eligible)``. Keeping the per-item numerator and
denominator lets one bootstrap serve every statistic: resample the items with replacement,
recompute each ratio, take the percentiles. Statistics of one measurement share the resamples.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

Stat = tuple[Tensor, Tensor]  # (numerator, denominator), each of shape (n,): one entry per item


def mean_stat(values: Float[Tensor, " n"]) -> Stat:
    """The mean of ``values`` as a ratio of sums."""
    values = values.detach().float().cpu()
    return values, torch.ones_like(values)


def flip_stat(base: Float[Tensor, " n"], score: Float[Tensor, " n"], sign: float) -> Stat:
    """Share of items not on the ``sign`` side at ``c = 0`` (``base · sign <= 0``) that are on it
    at ``c`` (``score · sign > 0``): the per-item flip rate toward the sign of ``c``."""
    eligible = (base.detach().cpu() * sign <= 0).float()
    flipped = eligible * (score.detach().cpu() * sign > 0).float()
    return flipped, eligible


def value(stat: Stat) -> float | None:
    """``sum(numerator) / sum(denominator)``; ``None`` when no item counts."""
    num, den = stat
    total = float(den.sum())
    return float(num.sum()) / total if total > 0 else None


def bootstrap(
    stats: dict[str, Stat], n_boot: int, seed: int, level: float = 0.95
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of every statistic (items resampled with replacement).

    Args:
        stats: ``{name: (numerator, denominator)}``, all over the same ``n`` items.
        n_boot: resamples.
        seed: seed of the resampling (the same indices for every statistic).
        level: coverage of the interval.

    Returns:
        ``{name: [lo, hi]}``; ``None`` for a statistic with no counting item. Resamples in which
        no item counts (a flip rate with few eligible items) are left out of its interval.
    """
    if not stats:
        return {}
    n = len(next(iter(stats.values()))[0])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=generator)  # (n_boot, n)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out: dict[str, list[float] | None] = {}
    for name, (num, den) in stats.items():
        if len(num) != n:
            raise ValueError(f"bootstrap: statistic {name!r} has {len(num)} items, not {n}")
        num_b = num.double()[idx].sum(1)  # (n_boot,)
        den_b = den.double()[idx].sum(1)
        ratios = num_b[den_b > 0] / den_b[den_b > 0]
        if ratios.numel() == 0 or float(den.sum()) == 0:
            out[name] = None
            continue
        lo, hi = torch.quantile(ratios, q).tolist()
        out[name] = [lo, hi]
    return out


def ratio_interval(
    num: Stat, den: Stat, n_boot: int, seed: int, level: float = 0.95
) -> list[float] | None:
    """Percentile interval of ``value(num) / value(den)`` with the two item sets resampled
    independently (e.g. the shift on opinionated sentences over the shift on neutral ones)."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for a, b in (num, den):
        idx = torch.randint(len(a), (n_boot, len(a)), generator=generator)  # (n_boot, n)
        parts.append(a.double()[idx].sum(1) / b.double()[idx].sum(1))
    ratios = parts[0] / parts[1]
    ratios = ratios[torch.isfinite(ratios)]
    if ratios.numel() == 0:
        return None
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(ratios, q).tolist()


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` sd for fewer than two values)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
