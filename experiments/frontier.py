"""The trait-vs-coherence frontier: what each method reaches at equal coherence, found by bisection.

Methods (the adapter and the steering-vector baselines) are not compared at equal ``c`` — their
``c`` scales mean different things — but at equal coherence: for each level (encoders: cosine
to the ``c = 0`` embedding 0.99 / 0.95 / 0.90; causal LMs: KL to ``c = 0`` of 0.1 / 0.5 / 1.0)
and each sign, :func:`search` brackets the ``c`` at which the meter's coherence crosses the level
(doubling / halving from a start) and bisects until the coherence is within
``rel_tol · |level − coherence at c = 0|`` of the level. The frontier entry is every statistic at
that ``c`` with bootstrap intervals, plus the same measured on extra sets (the opinionated
sentences) at the same ``c``, with ``shift_ratio``: the extra set's mean shift over the reported
set's (≈ 1 for a vector added at the output, which moves every input alike). The search assumes coherence moves away from ``c = 0`` monotonically
in ``|c|``; where it does not, it finds *a* crossing, and every measured point is kept.
"""

from collections.abc import Callable

from loguru import logger

from .metrics import row_of
from .stats import bootstrap, ratio_interval


def search(
    measure: Callable[[float], dict],
    ok: Callable[[dict], bool],
    close: Callable[[dict], bool] | None = None,
    start: float | int = 1.0,
    c_max: float | int = 1e4,
    rel_tol: float = 1e-4,
    max_evals: int = 40,
) -> dict:
    """The largest ``c > 0`` with ``ok(measure(c))``, assuming ``ok`` holds at ``c = 0``.

    Doubles ``c`` from ``start`` until ``ok`` fails (or ``c_max``), halves it until ``ok``
    holds, then bisects ``[lo, hi]``. Stops early at a ``c`` whose row is ``close`` to the
    target, or when ``hi − lo <= rel_tol · hi``, or after ``max_evals`` measurements.

    Returns:
        ``{"c", "row", "close", "lo", "hi", "evals"}``: ``c`` is the close point when one was
        found, else ``lo`` (the largest passing ``c``; 0 when none passed above the smallest
        ``c`` tried); ``hi`` is ``None`` when ``ok`` held up to ``c_max``.
    """
    if not 0 < start <= c_max:
        raise ValueError(f"search: need 0 < start <= c_max, got start={start}, c_max={c_max}")
    rows: dict[float, dict] = {}
    lo, hi = 0.0, None

    def step(c: float) -> bool:  # True: stop here (close enough)
        nonlocal lo, hi
        rows[c] = measure(c)
        if close is not None and close(rows[c]):
            return True
        if ok(rows[c]):
            lo = max(lo, c)
        else:
            hi = c if hi is None else min(hi, c)
        return False

    def result(c: float, is_close: bool) -> dict:
        row = rows.get(c)
        return {"c": c, "row": row, "close": is_close, "lo": lo, "hi": hi, "evals": len(rows)}

    c = float(start)
    while len(rows) < max_evals:  # bracket upwards
        if step(c):
            return result(c, True)
        if hi is not None or c >= c_max:
            break
        c = min(2 * c, c_max)
    while hi is not None and lo == 0 and len(rows) < max_evals and hi > start * 2**-30:
        if step(hi / 2):  # bracket downwards
            return result(hi / 2, True)
    while hi is not None and lo > 0 and hi - lo > rel_tol * hi and len(rows) < max_evals:
        c = (lo + hi) / 2
        if step(c):
            return result(c, True)
    return result(lo, False)


def level_key(level: float) -> str:
    """``0.9 -> "0.90"``, ``0.99 -> "0.99"``, ``0.1 -> "0.10"``: keys of the frontier dict."""
    return f"{level:.2f}"


def frontier(
    meter,
    method,
    levels: list[float | int],
    rel_tol: float,
    c_max: float | int,
    max_evals: int,
    extra: dict | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """One method's frontier: ``{level: {"+": entry, "-": entry}}`` and every measured row.

    Args:
        meter: the reported set's meter (its ``frontier_key`` is the coherence held fixed).
        method: an adapter or a steering vector (``with method(model, c=c)``).
        levels: coherence levels, ordered away from the ``c = 0`` value (0.99, 0.95, 0.90).
        rel_tol: the coherence must be within ``rel_tol · |level − base|`` of the level.
        c_max, max_evals: limits of each search.
        extra: ``{name: meter}`` measured at the frontier ``c`` too (e.g. opinionated sentences).
        n_boot, seed: bootstrap resamples and their seed.

    Returns:
        The frontier, and the rows of every ``c`` measured (both signs and ``c = 0``) for plots.
    """
    key, higher = meter.frontier_key, meter.higher_is_better
    cache: dict[float, dict] = {0.0: meter.stats(method, 0.0)}
    base = row_of(0.0, cache[0.0])[key]

    def measure(c: float) -> dict:
        if c not in cache:
            cache[c] = meter.stats(method, c)
        return row_of(c, cache[c])

    out: dict = {}
    for sign, name in ((1.0, "+"), (-1.0, "-")):
        start, saturated = 1.0, None
        for level in levels:
            if saturated is not None:  # coherence never crossed an easier level up to c_max
                out.setdefault(level_key(level), {})[name] = {**saturated, "evals": 0}
                continue
            tol = rel_tol * abs(level - base)
            found = search(
                lambda c, s=sign: measure(s * c),
                lambda r, lv=level: r[key] >= lv if higher else r[key] <= lv,
                lambda r, lv=level, t=tol: abs(r[key] - lv) <= t,
                start=start,
                c_max=c_max,
                max_evals=max_evals,
            )
            c = sign * found["c"]
            entry = {"c": c, "reached": found["close"], "evals": found["evals"]}
            if found["c"] > 0:
                stats = cache[c]
                entry.update(row_of(c, stats), ci=bootstrap(stats, n_boot, seed))
                for extra_name, extra_meter in (extra or {}).items():
                    s = extra_meter.stats(method, c)
                    entry[extra_name] = {**row_of(c, s), "ci": bootstrap(s, n_boot, seed)}
                    # input dependence: the shift on this set over the shift on the reported set
                    sh = meter.shift
                    if sh in s and sh in stats and entry[sh]:
                        entry[extra_name]["shift_ratio"] = entry[extra_name][sh] / entry[sh]
                        entry[extra_name]["ci"]["shift_ratio"] = ratio_interval(
                            s[sh], stats[sh], n_boot, seed
                        )
                start = found["c"]
            if not found["close"]:
                logger.warning(
                    "frontier: {}={} at sign {} not reached within {} evaluations (c={:.4g})",
                    key,
                    level,
                    name,
                    found["evals"],
                    c,
                )
            out.setdefault(level_key(level), {})[name] = entry
            if not found["close"] and found["hi"] is None and found["c"] >= c_max:
                saturated = entry
    curve = [row_of(c, cache[c]) for c in sorted(cache)]
    return out, curve
