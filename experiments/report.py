"""Run outputs: the metrics table, the plot, ``metrics.json`` and the sweep summary."""

import json
import math
from pathlib import Path

NAMES = {
    "p_positive": "P(positive)",
    "cosine": "cos to c=0",
    "retrieval": "retrieval@1",
    "margin": "logp margin",
    "nll": "NLL/token",
    "kl": "KL to c=0",
}


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with ``c`` first, then ``columns``."""
    header = ["c"] + [NAMES.get(k, k) for k in columns]
    body = [[f"{r['c']:+.2f}"] + [_fmt(r.get(k)) for k in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
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


def plot(
    path: Path,
    rows: list[dict],
    trait: str,
    coherence: tuple[str, ...],
    title: str,
    c_star: float | None,
) -> None:
    """Trait score (left axis) and coherence metrics (right panel) against ``c``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["c"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(cs, [r[trait] for r in rows], "o-", color="C0")
    left.set_xlabel("c")
    left.set_ylabel(NAMES.get(trait, trait))
    left.set_title("trait score")
    left.axvline(0, color="grey", lw=0.5)
    for i, key in enumerate(k for k in coherence if k in rows[0]):
        right.plot(cs, [r[key] for r in rows], "o-", color=f"C{i + 1}", label=NAMES.get(key, key))
    right.set_xlabel("c")
    right.set_title("coherence / content preservation")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if c_star is not None:
            for s in (c_star, -c_star):
                ax.axvline(s, color="red", lw=0.8, ls="--")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
