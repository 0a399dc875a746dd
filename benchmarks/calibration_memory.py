"""Case 5: memory held by calibration statistics vs the number of calibration tokens.

Three measures after ``collect_calibration`` on ``n`` tokens (batches generated on the fly, so
the inputs themselves are never held):

* ``nbytes``: :meth:`modlora.Calibration.nbytes`, the bytes of the statistics' tensors;
* ``live_tensor_bytes``: bytes of every torch tensor alive after the run (storages counted once,
  found through the garbage collector) minus the same count before the first run: anything the
  run kept, including tensors the statistics do not report;
* ``python_heap_peak``: ``tracemalloc`` peak of the Python heap during the run (torch tensors
  live outside it; this catches per-row Python objects such as lists).
"""

import gc
import time
import tracemalloc

import torch
from torch import nn

import modlora as ml


def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(): no lazy-module __class__ lookups
            continue
        try:
            if obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # tensors without a storage (sparse, functional wrappers...)
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _batches(vocab: int, tokens: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(max(1, round(tokens / (batch * seq)))):
        yield torch.randint(0, vocab, (batch, seq), generator=g)


def calibration_memory_case(
    model: nn.Module, vocab: int, token_counts, batch: int, seq: int, **layout_kw
) -> dict:
    layout = ml.find_targets(model, **layout_kw)
    rows, max_rows = {}, None
    before = _live_tensor_bytes()
    for n in token_counts:
        tracemalloc.start()
        t0 = time.process_time()
        cal = ml.collect_calibration(model, layout, _batches(vocab, n, batch, seq))
        seconds = time.process_time() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        after = _live_tensor_bytes()
        rows[str(n)] = {
            "tokens": cal.tokens(),
            "nbytes": cal.nbytes(),
            "live_tensor_bytes": after - before,
            "python_heap_peak": peak,
            "cpu_seconds": seconds,
        }
        max_rows = next(iter(cal.stats.values()))["all"].max_rows
        del cal
    counts = [str(n) for n in token_counts]
    first, last = rows[counts[0]], rows[counts[-1]]
    return {
        "targets": len(layout),
        "d_in": sorted({t.d_in for t in layout}),
        "max_rows": max_rows,
        "tokens": rows,
        "nbytes_last_over_first": last["nbytes"] / first["nbytes"],
        "live_last_over_first": last["live_tensor_bytes"] / max(1, first["live_tensor_bytes"]),
        "nbytes_last_over_max_rows_point": _after_max_rows_ratio(rows, counts, max_rows),
    }


def _after_max_rows_ratio(rows: dict, counts: list[str], max_rows: int) -> float | None:
    """``nbytes`` at the largest count over ``nbytes`` at the first count past the reservoir."""
    past = [c for c in counts if rows[c]["tokens"] >= max_rows]
    if len(past) < 2:
        return None
    return rows[past[-1]]["nbytes"] / rows[past[0]]["nbytes"]
