"""Multi-process runs of ``experiments.train``: ``torchrun`` or SLURM tasks, DDP or FSDP2.

One process (no ``WORLD_SIZE`` / SLURM task count above 1) is left exactly as it was: nothing
here starts, wraps or shards anything then.

With several processes every rank runs the whole training loop in lockstep:

* **Batches.** ``train.batch_size`` is the *global* batch. Every rank draws the same shuffled
  batch (same seed) and takes its contiguous slice (:func:`shard`); its loss terms (means over
  its rows) are weighted by ``rows on this rank · world / rows in the batch``, so the gradient
  DDP / FSDP2 average is the gradient of the full batch's mean — also for an uneven last batch.
  A rank left without rows takes the batch's first row at weight 0 (DDP and FSDP2 need every
  rank in every forward and backward). The learning rate is the single-process one.
* **Wrapping.** The adapter is attached (at ``c = 0``: the base model, exactly) and the model
  wrapped by :func:`modlora.distributed.parallelize` (``distributed.strategy=ddp|fsdp2``); the
  objective then calls the wrapped model and sets ``c`` on the attached adapter
  (:class:`AttachedCoefficient`) instead of attaching it per forward.
* **Decisions.** Logged losses and the validation loss are averaged over ranks
  (:func:`modlora.distributed.mean_over_ranks`), so early stopping and the heal rounds take the
  same branch everywhere.

SLURM: when ``torchrun``'s variables are absent, :func:`torch_env_from_slurm` derives them from
the SLURM task's (``srun`` / submitit with ``tasks_per_node`` > 1).
"""

import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import datetime

import torch
from loguru import logger

from modlora import distributed

from .config import ConfigError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------- environment
def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-05,9],cpu1"`` → ``"gpu03"``."""
    out, depth, i = [], 0, 0
    while i < len(nodelist):
        ch = nodelist[i]
        if ch == "," and depth == 0:
            break
        if ch == "[":
            close = nodelist.index("]", i)
            out.append(re.split(r"[,-]", nodelist[i + 1 : close])[0])  # the range's first id
            i = close + 1
            continue
        out.append(ch)
        i += 1
    host = "".join(out)
    if not host:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: no host in it")
    return host


def torch_env_from_slurm(env: Mapping[str, str]) -> dict:
    """``torchrun``'s variables for a SLURM task, or ``{}`` when there is nothing to translate.

    Nothing is translated when ``WORLD_SIZE`` is already set (``torchrun`` inside an allocation
    wins) or when the job step has one task. The step's task count is ``SLURM_STEP_NUM_TASKS``
    (set by ``srun``; submitit launches its tasks with ``srun``), else ``SLURM_NTASKS``.
    ``MASTER_ADDR`` is the job's first node; ``MASTER_PORT``, unless set, is derived from the
    job id (every task of a job computes the same port, jobs of an array differ).

    Args:
        env: the environment (``os.environ``).
    """
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return {}
    world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if world <= 1:
        return {}
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    job_id = int(env.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(1, world // max(1, nodes))),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "")),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job_id % 20000),
    }


def world_size_from_env(env: Mapping[str, str] = os.environ) -> int:
    """How many processes the environment says this run has (``torchrun`` or SLURM)."""
    return int(env.get("WORLD_SIZE") or torch_env_from_slurm(env).get("WORLD_SIZE", 1))


def start() -> distributed.ProcessInfo:
    """Start the process group when the environment names other processes (a no-op alone or
    when it is running); SLURM's variables are translated into ``torchrun``'s first."""
    os.environ.update(torch_env_from_slurm(os.environ))
    return distributed.setup()


def running() -> bool:
    """A process group is running in this process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def finish() -> None:
    """Close the process group (when one is running)."""
    if running():
        torch.distributed.destroy_process_group()


def freeze_hydra_clock() -> None:
    """Multi-process: make Hydra's ``${now:...}`` read rank 0's start time on every rank.

    Every rank resolves ``hydra.run.dir`` itself; a rank starting in another second would
    create a second run folder. Called before Hydra starts: the process group is started here
    and rank 0's clock shared, so all ranks resolve one folder (and write the same ``.hydra/``
    files into it). A sweep needs nothing: Hydra resolves its folder once and copies it to
    every job (submitit's tasks included).
    """
    if world_size_from_env() <= 1:
        return
    start()
    started = distributed.share_from_rank0(datetime.now())

    class _RunStart(datetime):
        @classmethod
        def now(cls, tz=None):
            return started if tz is None else started.astimezone(tz)

    import hydra.core.utils

    hydra.core.utils.datetime = _RunStart  # what the ${now:} resolver calls


# ---------------------------------------------------------------------- config
def check(cfg, world_size: int) -> None:
    """The ``distributed`` keys and what a multi-process run cannot do, before anything loads.

    Raises:
        ConfigError: the key that is wrong first.
    """
    strategy = cfg.distributed.strategy
    if strategy not in distributed.STRATEGIES:
        raise ConfigError(
            f"distributed.strategy={strategy!r}: must be one of {distributed.STRATEGIES}"
        )
    if world_size <= 1:
        return
    if cfg.objective.get("pcgrad", False):
        raise ConfigError(
            "objective.pcgrad=true: not supported with several processes (PCGrad needs the two "
            "global gradients, DDP / FSDP2 average only their sum); use objective.pcgrad=false"
        )
    if strategy == "fsdp2":
        if cfg.train.resume_from is not None:
            raise ConfigError(
                "train.resume_from: resuming is not supported with distributed.strategy=fsdp2 "
                "(the optimizer state is sharded); resume with ddp or fork with train.init_from"
            )
        if cfg.train.save_state:
            raise ConfigError(
                "train.save_state=true: the training state cannot be saved with "
                "distributed.strategy=fsdp2 (the optimizer state is sharded); "
                "set train.save_state=false or use ddp"
            )
        if cfg.objective.name == "heal":
            raise ConfigError(
                "objective=heal: the heal rounds re-wrap the model every round, which FSDP2's "
                "in-place sharding cannot; use distributed.strategy=ddp"
            )


def pick_device(cfg, info: distributed.ProcessInfo) -> None:
    """Multi-process: compute on this rank's device (``cuda:<local_rank>`` on CUDA)."""
    if info.world_size <= 1:
        return
    wanted = torch.device(cfg.device)
    if wanted.type != info.device.type:
        raise ConfigError(
            f"device={cfg.device!r}: this multi-process run computes on {info.device.type} "
            f"(the process group uses {torch.distributed.get_backend()}); set "
            f"device={info.device.type}, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU"
        )
    cfg.device = str(info.device)


# ---------------------------------------------------------------------- training
def shard(batch, rank: int, world: int) -> tuple:
    """This rank's contiguous slice of a global batch (an index tensor or a list of items) and
    the weight of its loss terms.

    Returns:
        ``(rows, weight)``: ``weight = len(rows) · world / len(batch)``, so the mean over ranks
        of the weighted per-rank means is the mean over the batch. A rank without rows gets the
        batch's first row and weight 0.
    """
    n = len(batch)
    lo, hi = rank * n // world, (rank + 1) * n // world
    if hi == lo:
        return batch[:1], 0.0
    return batch[lo:hi], (hi - lo) * world / n


class AttachedCoefficient:
    """Stands in for an adapter the objective would attach per forward: the adapter stays
    attached to the wrapped model (DDP / FSDP2 took its parameters with the model's) and
    ``with proxy(model, c=...)`` only sets ``c``, back to ``0`` (the exact base) on exit."""

    def __init__(self, adapter, wrapped) -> None:
        self.adapter, self.wrapped = adapter, wrapped

    @contextmanager
    def __call__(self, model, c=1.0):
        if model is not self.wrapped:
            raise ValueError("the objective must call the wrapped model in a multi-process run")
        self.adapter.set_coeff(c)
        try:
            yield self.adapter
        finally:
            self.adapter.set_coeff(0.0)


def wrap(objective, adapter, model, strategy: str):
    """Attach ``adapter`` at ``c = 0``, wrap ``model`` (DDP or FSDP2) and point the objective at
    the wrapped model; returns the wrapped model. Undo with :func:`unwrap`."""
    adapter.attach(model, c=0.0)
    wrapped = distributed.parallelize(model, strategy)
    objective.model, objective.adapter = wrapped, AttachedCoefficient(adapter, wrapped)
    return wrapped


def unwrap(objective, adapter, model, strategy: str) -> None:
    """After training: the objective back on the plain model. DDP: the adapter is detached and
    the wrapper dropped (the model is whole on every rank). FSDP2: the model stays sharded with
    the adapter attached at ``c = 0``, for the collective save that gathers it."""
    if strategy == "ddp":
        adapter.detach()
    objective.model, objective.adapter = model, adapter


def log_batches(cfg, world: int, strategy: str) -> None:
    """State the world size, per-rank and global batch and the learning rate."""
    batch = cfg.train.batch_size
    how = f"{strategy}, {torch.distributed.get_backend()}" if world > 1 else "one process"
    per_rank = (
        f"{batch // world}" if batch % world == 0 else f"{batch // world}-{-(-batch // world)}"
    )
    logger.info(
        "world size {} ({}): global batch {} = {} per rank; lr {:.2e} (not scaled: the global "
        "batch is the single-process one)",
        world,
        how,
        batch,
        per_rank,
        cfg.train.lr,
    )
