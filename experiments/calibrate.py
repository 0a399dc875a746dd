"""Calibration: the largest ``|c|`` whose coherence gates pass at ``+|c|`` and ``−|c|``, found by
bisection on the validation split — never on the sentences or pairs the report shows.

The gates compare a row with the same meter's row at ``c = 0`` (encoders: cosine to the base
embedding ``>= eval.gates.min_cosine``; causal LMs: NLL increase ``<= max_nll_increase`` and KL
``<= max_kl``). For each sign, :func:`experiments.frontier.search` doubles ``c`` from 1 until a
gate fails (up to ``eval.calibration.max_c``; no cap at 2) and bisects to ``rel_tol``; the
calibrated ``c`` is the smaller of the two signs' largest passing ``|c|``. It is stored in the
adapter's metadata as the deployed ``c``.
"""

from loguru import logger

from .frontier import search

SPLIT = "val"  # the split the calibration meter holds (recorded as calibration_split)


def calibrate(
    meter, adapter, gates, rel_tol: float, max_c: float | int, max_evals: int = 40
) -> dict:
    """Bisect the largest ``|c|`` passing ``meter.passes`` at both signs.

    Args:
        meter: a meter built on the validation split only.
        adapter: the trained adapter.
        gates: the ``eval.gates`` config.
        rel_tol: stop when the bracket is narrower than ``rel_tol · hi``.
        max_c: largest ``|c|`` tried.
        max_evals: measurements per sign at most.

    Returns:
        ``{"c", "calibrated", "split", "n_items", "plus", "minus", "at_max", "trace"}``: ``c`` is
        the calibrated ``|c|`` (``calibrated`` False when no ``|c|`` passed at some sign: then
        ``c`` is the smallest tried); ``at_max`` when the gates still passed at ``max_c``.
    """
    base = meter(adapter, 0.0)
    trace = []
    found = {}
    for sign, name in ((1.0, "plus"), (-1.0, "minus")):

        def measure(c: float, s=sign) -> dict:
            row = meter(adapter, s * c)
            trace.append({**row, "passed": meter.passes(row, base, gates)})
            return row

        found[name] = search(
            measure,
            lambda r: meter.passes(r, base, gates),
            start=1.0,
            c_max=max_c,
            rel_tol=rel_tol,
            max_evals=max_evals,
        )
    lo = min(found["plus"]["lo"], found["minus"]["lo"])
    at_max = all(f["hi"] is None for f in found.values())
    calibrated = lo > 0
    if not calibrated:
        lo = min(abs(t["c"]) for t in trace)
        logger.warning(
            "calibration: no |c| passes the gates on the {} split; storing {:.4g}", SPLIT, lo
        )
    logger.info(
        "calibrated |c| = {:.4f} on the {} split ({} items, {} measurements{})",
        lo,
        SPLIT,
        len(meter),
        len(trace),
        ", gates still pass at max_c" if at_max else "",
    )
    return {
        "c": lo,
        "calibrated": calibrated,
        "split": SPLIT,
        "n_items": len(meter),
        "plus": found["plus"]["lo"],
        "minus": found["minus"]["lo"],
        "at_max": at_max,
        "base": base,
        "trace": trace,
    }
