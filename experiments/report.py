"""Run outputs: the grid and frontier tables, the plot and ``metrics.json``."""

import json
import math
from pathlib import Path

NAMES = {
    "p_positive": "P(positive)",
    "logit_shift": "probe-logit shift",
    "flip_rate": "flip rate",
    "cosine": "cos to c=0",
    "retrieval": "retrieval@1",
    "margin": "logp margin",
    "margin_shift": "margin shift",
    "nll": "NLL/token",
    "kl": "KL to c=0",
    "shift_ratio": "shift ratio (opinionated / neutral)",
}
SHORT = {"cosine": "cos", "kl": "KL"}


def format_table(rows: list[dict], columns: list[str], cis: list[dict] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts) with ``c`` first, then ``columns``; with ``cis``
    (one ``{key: [lo, hi]}`` per row), every value is followed by its interval."""
    header = ["c"] + [NAMES.get(k, k) for k in columns]
    cis = cis or [{} for _ in rows]
    body = [
        [f"{r['c']:+.2f}"] + [_fmt(r.get(k), ci.get(k)) for k in columns]
        for r, ci in zip(rows, cis, strict=True)
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _fmt(value, interval=None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.3f}"
        return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
    return str(value)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def method_label(name: str, metrics: dict | None = None) -> str:
    """``vector_mid`` -> ``mean-diff vector @ block 3``; ``adapter`` -> ``lora r=8``."""
    if name == "adapter":
        return f"{metrics['adapter']} r={metrics['r']}" if metrics else "adapter"
    kind, place = name.split("_")
    block = (metrics or {}).get("baselines", {}).get(name, {}).get("block")
    where = "output" if place == "out" else (f"block {block}" if block is not None else "mid block")
    return f"{'mean-diff vector' if kind == 'vector' else 'random direction'} @ {where}"


def _cell(entry: dict, key: str, ci: bool = True) -> str:
    v = entry.get(key)
    if v is None:
        return "-"
    text = f"{v:.3f}" + ("" if entry.get("reached", True) else "*")
    interval = (entry.get("ci") or {}).get(key)
    if ci and interval is not None:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    return text


def format_frontier(metrics: dict, key: str | None = None, where: str | None = None) -> str:
    """A markdown table: one row per method, one column per level, ``+c / −c`` in each cell.

    Args:
        metrics: a run's ``metrics.json`` content.
        key: the statistic (default: the trait).
        where: ``None`` for the reported set, or an extra set's name (``"opinionated"``).
    """
    key = key or metrics["trait"]
    front = metrics["frontier"]
    levels = list(next(iter(front.values())).keys())
    short = SHORT.get(metrics["frontier_key"], metrics["frontier_key"])
    title = f"{NAMES.get(key, key)}{' on ' + where if where else ''} at equal {NAMES.get(metrics['frontier_key'])}"
    lines = [
        f"{title} (+c / -c, 95% bootstrap interval; * = level not reached)",
        "| method | " + " | ".join(f"{short} {lv}" for lv in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for name, by_level in front.items():
        cells = []
        for lv in levels:
            pair = []
            for sign in ("+", "-"):
                entry = by_level[lv][sign]
                entry = (
                    {**entry.get(where, {}), "reached": entry.get("reached")} if where else entry
                )
                pair.append(_cell(entry, key))
            cells.append(" / ".join(pair))
        lines.append(f"| {method_label(name, metrics)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
