"""Hydra callbacks: the sweep summary written after a multirun."""

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from loguru import logger

from .report import format_table


def summarize(sweep_dir: Path) -> str | None:
    """Collect every job's ``metrics.json`` under ``sweep_dir`` into ``summary.md`` / ``summary.csv``.

    Returns the table (``None`` when no job wrote metrics).
    """
    sweep_dir = Path(sweep_dir)
    rows = []
    for path in sorted(
        sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)
    ):
        m = json.loads(path.read_text())
        base = next((r for r in m["rows"] if r["c"] == 0), {})
        plus = next((r for r in m["rows"] if r["c"] == 1), {})
        minus = next((r for r in m["rows"] if r["c"] == -1), {})
        coherence = "cosine" if "cosine" in base else "kl"
        rows.append(
            {
                "job": path.parent.name,
                "adapter": m["adapter"],
                "r": m["r"],
                "objective": m["objective"],
                "spearman": m["spearman"],
                f"{m['trait']}@-1": minus.get(m["trait"]),
                f"{m['trait']}@0": base.get(m["trait"]),
                f"{m['trait']}@+1": plus.get(m["trait"]),
                f"{coherence}@+1": plus.get(coherence),
                "c*": m["calibrated_c"],
                "steps": m["train"]["steps"],
                "seconds": int(round(m["seconds"].get("total", 0))),
            }
        )
    if not rows:
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r))
    header = "| " + " | ".join(keys) + " |"
    sep = "|" + "|".join("---" for _ in keys) + "|"
    lines = [header, sep]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    table = "\n".join(lines)
    (sweep_dir / "summary.md").write_text(table + "\n")
    csv = [",".join(keys)] + [",".join(_cell(r.get(k)) for k in keys) for r in rows]
    (sweep_dir / "summary.csv").write_text("\n".join(csv) + "\n")
    return table


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


class SweepSummary(Callback):
    """After a multirun, write ``summary.md`` and ``summary.csv`` into the sweep folder and print them."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = summarize(sweep_dir)
        if table is None:
            logger.warning("no job in {} wrote metrics.json", sweep_dir)
            return
        print(f"sweep summary ({sweep_dir / 'summary.md'}):\n{table}")


__all__ = ["SweepSummary", "format_table", "summarize"]
