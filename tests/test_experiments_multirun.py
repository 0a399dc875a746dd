"""A 2-job multirun through the joblib launcher writes two run folders and a summary table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_joblib_multirun_writes_one_folder_per_job_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "-m",
        "hydra/launcher=local",
        "adapter.r=2,4",
        "model=tiny_bert",
        "train=smoke",
        "train.max_steps=2",
        "train.save_state=false",
        "data.n_train=10",
        "eval.c_grid=[-1,0,1]",
        "eval.calibrate=false",
        "eval.frontier.max_evals=4",
        "eval.baselines.methods=[]",
        "plot=false",
        "threads=1",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    ranks = []
    for job in jobs:
        assert (job / "adapter.safetensors").is_file()
        assert (job / "train.log").is_file()
        ranks.append(json.loads((job / "metrics.json").read_text())["r"])
    assert sorted(ranks) == [2, 4]
    tables = (sweep / "summary.md").read_text().split("\n\n")
    assert len(tables[0].splitlines()) == 4  # header, separator, two jobs
    # then the frontier over seeds: the two jobs differ in adapter.r, so two groups of one seed
    assert "mean ± sd over seeds" in tables[1]
    assert "adapter.r=2" in tables[1] and "adapter.r=4" in tables[1]
    assert "sweep summary" in done.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
