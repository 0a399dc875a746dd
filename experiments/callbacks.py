"""Hydra callbacks: the sweep summary written after a multirun.

``summary.md`` holds one row per job and, for each group of jobs that differ only in ``seed``,
the frontier of every method as mean ± sd over the seeds (the trait, the flip rate, and on
encoders the opinionated sentences' flip rate and cosine). ``summary.csv`` has the job rows.
"""

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from loguru import logger

from .report import NAMES, format_table, method_label
from .stats import mean_sd

SEED_KEYS = ("seed", "data.seed", "eval.bootstrap.seed")  # what a seed sweep varies


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: json.dumps(v)})
    return out


def _groups(runs: list[dict]) -> list[tuple[str, list[dict]]]:
    """Runs grouped by their config minus the seeds; each group labelled by what differs."""
    flats = [{k: v for k, v in _flat(m["config"]).items() if k not in SEED_KEYS} for m in runs]
    shared = set.intersection(*(set(f) for f in flats))  # e.g. alpha exists for LoRA only
    varying = sorted(k for k in shared if len({f[k] for f in flats}) > 1)
    groups: dict[str, list[dict]] = {}
    for m, f in zip(runs, flats, strict=True):
        label = ", ".join(f"{k}={json.loads(f[k])}" for k in varying) or "all jobs"
        groups.setdefault(label, []).append(m)
    return list(groups.items())


def _mean_sd(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m, sd = mean_sd(values)
    return f"{m:.3f}" if len(values) < 2 else f"{m:.3f} ± {sd:.3f}"


def frontier_summary(runs: list[dict], key: str, where: str | None = None) -> str:
    """Mean ± sd over the runs (seeds) of ``key`` at every frontier level, per group and method."""
    first = runs[0]
    levels = list(next(iter(first["frontier"].values())).keys())
    coherence = first["frontier_key"]
    short = {"cosine": "cos", "kl": "KL"}.get(coherence, coherence)
    on = f" on the {where} sentences" if where else ""
    lines = [
        f"{NAMES.get(key, key)}{on} at equal {NAMES.get(coherence, coherence)}, +c / -c, "
        f"mean ± sd over seeds",
        "| group | seeds | method | " + " | ".join(f"{short} {lv}" for lv in levels) + " |",
        "|---|---|---|" + "---|" * len(levels),
    ]
    for label, group in _groups(runs):
        seeds = ",".join(str(m["seed"]) for m in group)
        for method in group[0]["frontier"]:
            cells = []
            for lv in levels:
                pair = []
                for sign in ("+", "-"):
                    entries = [m["frontier"][method][lv][sign] for m in group]
                    entries = [e.get(where, {}) if where else e for e in entries]
                    pair.append(_mean_sd([e.get(key) for e in entries]))
                cells.append(" / ".join(pair))
            name = method_label(method, group[0])
            lines.append(f"| {label} | {seeds} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(sweep_dir: Path) -> str | None:
    """Collect every job's ``metrics.json`` under ``sweep_dir`` into ``summary.md`` / ``summary.csv``.

    Returns the markdown (``None`` when no job wrote metrics).
    """
    sweep_dir = Path(sweep_dir)
    runs, rows = [], []
    for path in sorted(
        sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)
    ):
        m = json.loads(path.read_text())
        runs.append(m)
        mid = m["frontier"]["adapter"][mid_key(m)]
        rows.append(
            {
                "job": path.parent.name,
                "adapter": m["adapter"],
                "r": m["r"],
                "lr": m["config"]["train"]["lr"],
                "seed": m["seed"],
                "objective": m["objective"],
                f"{m['trait']}+ at {m['frontier_key']} {mid_key(m)}": mid["+"].get(m["trait"]),
                f"{m['trait']}- at {m['frontier_key']} {mid_key(m)}": mid["-"].get(m["trait"]),
                "c*": m["calibrated_c"],
                "best_val": m["train"]["best_val"],
                "steps": m["train"]["steps"],
                "seconds": int(round(m["seconds"].get("total", 0))),
            }
        )
    if not rows:
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    shift = "logit_shift" if runs[0]["trait"] == "p_positive" else "margin_shift"
    parts = ["\n".join(lines), frontier_summary(runs, runs[0]["trait"])]
    parts += [frontier_summary(runs, shift), frontier_summary(runs, "flip_rate")]
    if any("opinionated" in e for e in runs[0]["frontier"]["adapter"][mid_key(runs[0])].values()):
        parts.append(frontier_summary(runs, "flip_rate", "opinionated"))
        parts.append(frontier_summary(runs, "cosine", "opinionated"))
        parts.append(frontier_summary(runs, "shift_ratio", "opinionated"))
    text = "\n\n".join(parts)
    (sweep_dir / "summary.md").write_text(text + "\n")
    csv = [",".join(keys)] + [",".join(_cell(r.get(k)) for k in keys) for r in rows]
    (sweep_dir / "summary.csv").write_text("\n".join(csv) + "\n")
    return text


def mid_key(metrics: dict) -> str:
    """The frontier level in the middle of the list (cos 0.95 / KL 0.5 by default)."""
    levels = list(metrics["frontier"]["adapter"])
    return levels[len(levels) // 2]


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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
