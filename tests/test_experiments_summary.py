"""The sweep summary: one row per job, and the frontier as mean ± sd over the seeds of a group."""

import json
from pathlib import Path

from jaxtyping import install_import_hook

with install_import_hook("experiments", "beartype.beartype"):
    from experiments.callbacks import summarize


def _job(folder: Path, seed: int, kind: str, p_plus: float, flip: float) -> None:
    entry = {
        "+": {"c": 1.0, "p_positive": p_plus, "flip_rate": flip, "reached": True},
        "-": {"c": -1.0, "p_positive": 1 - p_plus, "flip_rate": flip / 2, "reached": True},
    }
    levels = {"0.99": entry, "0.95": entry, "0.90": entry}
    metrics = {
        "adapter": kind,
        "r": 8,
        "seed": seed,
        "objective": "encoder",
        "trait": "p_positive",
        "frontier_key": "cosine",
        "frontier_levels": [0.99, 0.95, 0.9],
        "frontier": {"adapter": levels, "vector_out": levels},
        "baselines": {"vector_out": {"block": 5, "norm": 1.0}},
        "calibrated_c": 0.5,
        "train": {"steps": 3, "best_val": 0.25},
        "seconds": {"total": 1.0},
        "config": {
            "seed": seed,
            "adapter": {"kind": kind},
            "data": {"seed": seed},
            "train": {"lr": 0.01},
        },
    }
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_summary_reports_mean_and_sd_over_the_seeds_of_each_group(tmp_path):
    values = {"lora": [0.1, 0.2, 0.3], "pissa": [0.5, 0.5, 0.8]}
    job = 0
    for kind, ps in values.items():
        for seed, p in enumerate(ps):
            _job(tmp_path / str(job), seed, kind, p, 2 * p)
            job += 1
    text = summarize(tmp_path)
    lines = text.splitlines()
    assert len([line for line in lines if line.startswith("| ") and "seconds" not in line]) > 6
    lora = next(line for line in lines if "adapter.kind=lora" in line and "lora r=8" in line)
    # mean 0.2, sample sd 0.1; the -c side is 1 - p: mean 0.8, same sd
    assert lora.count("0.200 ± 0.100 / 0.800 ± 0.100") == 3
    assert "| 0,1,2 |" in lora
    pissa = next(line for line in lines if "adapter.kind=pissa" in line and "pissa r=8" in line)
    assert "0.600 ± 0.173 / 0.400 ± 0.173" in pissa  # sd of (0.5, 0.5, 0.8) = 0.1732
    flips = text.split("flip rate at equal")[1]
    assert "0.400 ± 0.200 / 0.200 ± 0.100" in flips  # flip = 2p on +c, p on -c
    assert (tmp_path / "summary.md").read_text().strip() == text.strip()
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 7  # header + 6 jobs
