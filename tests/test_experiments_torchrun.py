"""``torchrun --nproc_per_node=2 -m experiments.train`` on 2 CPU processes (gloo) with DDP, and the
same run as two SLURM tasks with FSDP2 (SLURM's variables set as srun sets them, no SLURM needed):
one run folder, written by rank 0, whose adapter is the single-process run's with the same global
batch and seed.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from experiments.evaluate import CONF_DIR
from experiments.train import run

# 9 training pairs = 18 sentences; a global batch of 7 gives batches of 7, 7 and 4 rows, split
# 4 / 3, 4 / 3 and 2 / 2 over the ranks: the uneven slices' weights are part of what is tested.
# Two epochs: the second starts from a newly shuffled order and follows a validation pass.
OVERRIDES = [
    "model=tiny_bert",
    "train=smoke",
    "data.n_train=10",
    "train.batch_size=7",
    "train.max_steps=4",
    "train.epochs=2",
    "train.lr=1e-3",
    "train.patience=10",
    "eval.c_grid=[-1,0,1]",
    "eval.calibrate=false",
    "eval.frontier.max_evals=4",
    "eval.baselines.methods=[]",
    "eval.bootstrap.n=200",
    "plot=false",
    "threads=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    """The reference: the same config in this process (one rank, the whole batch)."""
    out = tmp_path_factory.mktemp("single") / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=OVERRIDES)
    run(cfg, out)
    return out / "adapter.safetensors"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(CONF_DIR).parent),  # this checkout, not another install
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even where a GPU is present
        **extra,
    }


def _torchrun(cwd: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={_free_port()}", "-m", "experiments.train", *args]
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _srun(cwd: Path, args: list[str]) -> None:
    """Two tasks of a SLURM job step as srun starts them: SLURM's variables, not torchrun's."""
    port = _free_port()
    job = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}
    job |= {"SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}
    if 20000 <= port < 40000:  # a job id whose derived port (20000 + id mod 20000) is free
        job["SLURM_JOB_ID"] = str(port)
    else:
        job["MASTER_PORT"] = str(port)
    cmd = [sys.executable, "-m", "experiments.train", *args]
    tasks = [
        subprocess.Popen(
            cmd,
            cwd=cwd,
            env=_env(**job, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err[-4000:]


@pytest.mark.slow
# each launcher and each strategy once (a run costs ~20 s, mostly two processes starting up)
@pytest.mark.parametrize(
    "launch,strategy", [(_torchrun, "ddp"), (_srun, "fsdp2")], ids=["torchrun-ddp", "srun-fsdp2"]
)
def test_two_processes_write_one_run_folder_with_the_single_process_adapter(
    tmp_path, single_process, launch, strategy
):
    extra = ["train.save_state=false"] if strategy == "fsdp2" else []  # (refused under FSDP2)
    launch(tmp_path, [*OVERRIDES, f"distributed.strategy={strategy}", *extra])

    # every rank resolved ${now:} to rank 0's start time: one folder, not one per rank
    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders
    run_dir = folders[0]
    written = {p.name for p in run_dir.iterdir()}
    assert {"adapter.safetensors", "metrics.json", "train.log", ".hydra"} <= written
    if strategy == "ddp":
        assert "state" in written  # rank 0 saved the training state (whole tensors under DDP)
    log = (run_dir / "train.log").read_text()
    assert f"world size 2 ({strategy}, gloo): global batch 7 = 3-4 per rank; lr 1.00e-03" in log

    got, want = load_file(run_dir / "adapter.safetensors"), load_file(single_process)
    assert got.keys() == want.keys()
    assert any(t.abs().sum() > 0 for k, t in want.items() if k.endswith("lora_B"))  # it trained
    for name in want:
        # fp32 tolerance: the two ranks' gradients are averaged, not summed in one pass, and
        # each rank pads its slice to its own longest sentence
        torch.testing.assert_close(got[name], want[name], msg=name)
