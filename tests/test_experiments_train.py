"""Smoke runs of every objective on tiny models, resume / fork, and reloading the saved adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from jaxtyping import install_import_hook

import modlora as ml

# the experiments' tensor signatures are checked at run time, like modlora's
with install_import_hook("experiments", "beartype.beartype"):
    from experiments.config import ConfigError
    from experiments.evaluate import reevaluate
    from experiments.paths import CONF_DIR
    from experiments.train import run

FAST_EVAL = [
    "eval.c_grid=[-1,0,1]",
    "eval.calibrate=false",
    "plot=false",
    "threads=1",
    # a few trained steps leave tiny deltas: the frontier levels may need huge c; cap the search
    # and leave the baselines out unless a test is about them
    "eval.frontier.max_evals=4",
    "eval.calibration.max_evals=8",
    "eval.baselines.methods=[]",
    "eval.bootstrap.n=200",
]
WITH_BASELINES = ["eval.baselines.methods=[vector_out,vector_mid,random_out,random_mid]"]


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _encoder(*extra):
    # 9 training pairs = 18 sentences = one full batch per step: the loss is comparable step to step
    return [
        "model=tiny_bert",
        "train=smoke",
        "data.n_train=10",
        "train.batch_size=18",
        "train.lr=1e-3",
        "train.patience=10",
        *FAST_EVAL,
        *extra,
    ]


def _causal(experiment, *extra):
    return [
        f"experiment={experiment}",
        "model.loader.hidden_size=32",
        "model.loader.num_layers=2",
        "data.max_pairs=8",
        "train.batch_size=8",
        "train.lr=2e-2",
        "train.patience=10",
        "model.max_length=96",
        *FAST_EVAL,
        *extra,
    ]


def _run(overrides, tmp_path: Path, name="run") -> tuple[dict, Path]:
    run_dir = tmp_path / name
    return run(_compose(overrides), run_dir), run_dir


@pytest.mark.slow
def test_encoder_smoke_lowers_loss_and_writes_the_run_folder(tmp_path):
    metrics, run_dir = _run(
        _encoder(
            "train.max_steps=6", "train.epochs=6", "eval.frontier.max_evals=12", *WITH_BASELINES
        ),
        tmp_path,
    )
    losses = metrics["train"]["losses"]
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    for name in ("adapter.safetensors", "metrics.json", "state/epoch_1/adapter.safetensors"):
        assert (run_dir / name).is_file(), name
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["rows"] == metrics["rows"]
    assert [r["c"] for r in metrics["rows"]] == [-1.0, 0.0, 1.0]
    # the adapter and the steering baselines on the frontier (the tiny BERT has 2 blocks: the
    # "mid" baselines coincide with "out" and are skipped)
    assert set(on_disk["frontier"]) == {"adapter", "vector_out", "random_out"}
    assert set(on_disk["baselines"]) == {"vector_out", "random_out"}
    for by_level in on_disk["frontier"].values():
        assert list(by_level) == ["0.99", "0.95", "0.90"]
        for entry in (e for pair in by_level.values() for e in pair.values()):
            if entry["reached"]:
                lo, hi = entry["ci"]["p_positive"]
                assert lo <= entry["p_positive"] <= hi
                assert {"cosine", "logit_shift", "flip_rate"} <= set(entry["opinionated"])
    assert on_disk["smoke_test"] is True and on_disk["calibration_split"] is None


@pytest.mark.slow
def test_pissa_with_activation_scores_trains(tmp_path):
    metrics, run_dir = _run(
        _encoder("adapter=pissa", "adapter.selection_score=wanda", "train.lr=1e-2"), tmp_path
    )
    losses = metrics["train"]["losses"]
    assert losses[-1] < losses[0]
    meta = ml.read_metadata(run_dir / "adapter.safetensors")
    assert (meta["kind"], meta["selection_score"]) == ("pissa", "wanda")


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment,extra",
    [
        ("tiny_llama_persona", ["objective.pcgrad=false"]),
        ("tiny_llama_persona", ["objective.pcgrad=true", "objective.top_k=null"]),
        (
            "tiny_gpt2_heal",
            ["objective.rounds=2", "objective.aggregate=p95", "objective.anchor=prev"],
        ),
    ],
)
def test_causal_objectives_lower_loss(tmp_path, experiment, extra):
    steps = 3 if "heal" in experiment else 5
    metrics, run_dir = _run(
        _causal(
            experiment, f"train.max_steps={steps}", f"train.epochs={steps}", *WITH_BASELINES, *extra
        ),
        tmp_path,
    )
    losses = metrics["train"]["losses"]
    rounds = 2 if "heal" in experiment else 1
    assert len(losses) == steps * rounds
    assert losses[steps - 1] < losses[0]  # (the first round's) training loss went down
    assert metrics["frontier_key"] == "kl" and metrics["frontier_levels"] == [0.1, 0.5, 1.0]
    # 2 blocks: the "mid" baselines coincide with "out" and are skipped
    assert set(metrics["frontier"]) == {"adapter", "vector_out", "random_out"}
    meta = ml.read_metadata(run_dir / "adapter.safetensors")
    assert meta["kind"] == ("history" if "heal" in experiment else "lora")
    assert meta["extra_meta"]["config"]["objective"]["name"] == metrics["objective"]
    if "heal" in experiment:
        # every kept round is one entry of the history (round 1 is always kept)
        assert 1 <= len(meta["round_info"]) == len(metrics["kept_rounds"]) <= 2


@pytest.mark.slow
def test_saved_adapter_reloads_and_reproduces_the_logged_metrics(tmp_path):
    metrics, run_dir = _run(_encoder("train.max_steps=3", "eval.calibrate=true"), tmp_path)
    path = run_dir / "adapter.safetensors"
    meta = ml.read_metadata(path)
    assert meta["c"] == metrics["calibrated_c"]
    assert meta["extra_meta"]["metrics"]["rows"] == metrics["rows"]
    again = reevaluate(str(path), out_dir=tmp_path, make_plot=False)
    # the same computation with the training run's thread count (reevaluate restores it): the
    # probe refit and every row agree bit for bit (with 2 threads instead of 1 the embeddings
    # moved by 6e-8 and the probe fit amplified that to 4e-5 in P(positive))
    assert again["rows"] == metrics["rows"]
    assert again["frontier"].keys() == metrics["frontier"].keys()
    assert again["deployed_c"] == metrics["calibrated_c"]

    # the command-line form: python -m experiments.evaluate checkpoint=PATH
    out = tmp_path / "evaluate"
    cmd = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        f"checkpoint={path}",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(CONF_DIR).parent)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "largest difference from the logged metrics" in done.stdout
    cli = json.loads((out / "metrics.json").read_text())
    assert cli["max_abs_diff"] <= 1e-5  # fp32 forward in a fresh process: assert_close's atol
    assert (out / "plot.png").is_file() and (out / "evaluate.log").is_file()


@pytest.mark.slow
def test_resume_continues_exactly_and_fork_starts_from_the_loaded_weights(tmp_path):
    # one step per epoch (full batch), three epochs: state/epoch_1 is saved after step 1
    cfg = _encoder("train.max_steps=3", "train.epochs=3", "train.warmup_ratio=0")
    full, full_dir = _run(cfg, tmp_path, "full")
    state = full_dir / "state" / "epoch_1"
    assert (state / "training_state.pt").is_file()

    resumed, _ = _run([*cfg, f"train.resume_from={state}"], tmp_path, "resumed")
    # the resumed run continues from step 1: same losses as the uninterrupted run, bit for bit
    assert resumed["train"]["losses"] == full["train"]["losses"]
    assert resumed["train"]["steps"] == full["train"]["steps"] == 3

    forked, _ = _run([*cfg, f"train.init_from={state}"], tmp_path, "forked")
    # a fork starts a new run (3 fresh steps) from the saved weights: its first loss is the
    # source's loss at step 2 (same weights, same full batch; only the row order differs, so
    # fp32 summation order may differ)
    assert len(forked["train"]["losses"]) == 3
    torch.testing.assert_close(
        torch.tensor(forked["train"]["losses"][0]), torch.tensor(full["train"]["losses"][1])
    )
    assert forked["train"]["losses"][0] < full["train"]["losses"][0]


@pytest.mark.slow
def test_fork_or_resume_of_a_different_adapter_kind_is_refused_at_startup(tmp_path):
    # a PiSSA run may not fork (or resume) a LoRA state; nothing is loaded, trained or written
    _, src_dir = _run(_encoder("train.max_steps=1", "train.epochs=1"), tmp_path, "src")
    before = {p: p.read_bytes() for p in src_dir.rglob("*") if p.is_file()}
    for key, source in (
        ("init_from", src_dir / "adapter.safetensors"),
        ("resume_from", src_dir / "state" / "epoch_1"),
    ):
        cfg = _compose(_encoder("adapter=pissa", f"train.{key}={source}"))
        with pytest.raises(
            ConfigError, match=rf"train\.{key}=.*lora adapter but adapter\.kind='pissa'"
        ):
            run(cfg, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
    assert {p: p.read_bytes() for p in src_dir.rglob("*") if p.is_file()} == before
