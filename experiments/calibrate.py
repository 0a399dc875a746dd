"""``c_scan``: the largest ``|c|`` (walking down from a start value) whose coherence gates pass.

At each step both ``+|c|`` and ``−|c|`` are measured and compared with ``c = 0`` by the meter's
gates (encoders: cosine to the base embedding, paraphrase retrieval; causal LMs: NLL increase
and KL). The first ``|c|`` where both pass is the calibrated coefficient; it is stored in the
adapter's metadata as the deployed ``c``.
"""

from loguru import logger


def c_scan(
    meter, adapter, gates, start: float, factor: float, min_c: float, base: dict | None = None
) -> dict:
    """Walk ``|c|`` down from ``start`` (``× factor`` per step) until the gates pass at ``±|c|``.

    Args:
        meter: an ``EncoderMeter`` or ``CausalMeter`` (``meter(adapter, c)``, ``meter.passes``).
        adapter: the trained adapter.
        gates: the ``eval.gates`` config.
        start: first ``|c|`` tried.
        factor: multiplier per step, in (0, 1).
        min_c: stop below this ``|c|``.
        base: the meter's row at ``c = 0`` (measured when ``None``).

    Returns:
        ``{"c": chosen |c|, "calibrated": whether the gates passed, "scan": [rows...]}``; when
        nothing passes, ``c`` is the smallest ``|c|`` tried and ``calibrated`` is False.
    """
    if not 0 < factor < 1:
        raise ValueError(f"eval.c_scan.factor must be in (0, 1), got {factor}")
    base = base if base is not None else meter(adapter, 0.0)
    scan = []
    c = float(start)
    last = c
    while c >= min_c:
        rows = [meter(adapter, c), meter(adapter, -c)]
        ok = all(meter.passes(row, base, gates) for row in rows)
        scan.append({"abs_c": c, "passed": ok, "plus": rows[0], "minus": rows[1]})
        logger.info("c_scan |c|={:.4f}: {}", c, "pass" if ok else "fail")
        if ok:
            return {"c": c, "calibrated": True, "scan": scan}
        last = c
        c *= factor
    logger.warning(
        "c_scan: no |c| >= {} passes the coherence gates; storing {:.4f} uncalibrated", min_c, last
    )
    return {"c": last, "calibrated": False, "scan": scan}
