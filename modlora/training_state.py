"""Save, resume and fork a training run: adapter + optimizer + scheduler + step + RNG states.

A training-state checkpoint is a folder:

========================  ==========================================================================
``adapter.safetensors``   the adapter (:mod:`modlora.checkpoint` format; loads on its own)
``training_state.pt``     optimizer and scheduler state dicts, step, RNG states (torch CPU, CUDA,
                          Python ``random``, NumPy's global generator), the optimizer's parameter
                          names, and the digest of the adapter tensors it belongs to
========================  ==========================================================================

Both files are written atomically, adapter first. A crash between the two leaves a state file
whose digest no longer matches the adapter, and :func:`resume_training` says so.

- **Resume** (:func:`resume_training`): the same run continues. Build the adapter, optimizer and
  scheduler exactly as at the start of the run (or the adapter with
  :func:`~modlora.load_adapter`), then resume: weights, optimizer moments, scheduler position
  and RNG states are restored, so the next step equals the uninterrupted run's, bit for bit on
  a deterministic CPU run.
- **Fork** (:func:`fork_training`): a new run starts from the saved weights only (fresh optimizer,
  scheduler and RNG), and its first loss is the source run's loss on the same batch.

Example:
    >>> save_training_state("run/step_100", lora, opt, sched, step=100)
    >>> lora2 = ModulatedLoRA(model, r=8, ...); opt2 = AdamW(lora2.parameters()); sched2 = ...
    >>> step = resume_training("run/step_100", lora2, opt2, sched2).step
    >>> forked = fork_training("run/step_100", model)
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .adapter import LowRankAdapter
from .checkpoint.io import StoredFile, read_file
from .checkpoint.spec import group_tensors, metadata_of
from .kinds import kind_class
from .rng import capture_rng, restore_rng

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
STATE_VERSION = 1
_CONFIG_KEYS = (
    "kind",
    "r",
    "alpha",
    "targets",
    "exclude",
    "layer_range",
    "dtype",
    "dropout",
    "init",
    "selection_score",
    "rank_pattern",
    "alpha_pattern",
    "shapes",
)


@dataclass
class TrainingState:
    """What :func:`resume_training` returns: the step to continue from and the user's ``extra``."""

    step: int
    path: Path
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- helpers
def _param_names(adapter: LowRankAdapter, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The adapter name of every optimizer parameter, group by group."""
    names = {id(p): n for n, p in adapter.named_parameters()}
    out, foreign = [], 0
    for group in optimizer.param_groups:
        out.append([names.get(id(p), "") for p in group["params"]])
        foreign += out[-1].count("")
    if foreign:
        raise ValueError(
            f"the optimizer holds {foreign} parameter(s) that are not the adapter's: build it "
            "from adapter.parameters()"
        )
    return out


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    folder = Path(path)
    return folder / ADAPTER_FILE, folder / STATE_FILE


def _config(adapter: LowRankAdapter) -> dict:
    """The adapter's configuration as :func:`~modlora.read_metadata` would decode it."""
    meta = metadata_of(adapter, {}, None, fingerprints={})
    plain = ("kind", "dtype")
    return {k: meta[k] if k in plain else json.loads(meta[k]) for k in _CONFIG_KEYS if k in meta}


# ---------------------------------------------------------------------------- save
def save_training_state(
    path: str | os.PathLike,
    adapter: LowRankAdapter,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    step: int = 0,
    *,
    extra: dict | None = None,
    extra_meta: dict | None = None,
    c: float | None = None,
) -> Path:
    """Write a training-state folder (created if needed) that :func:`resume_training` reads.

    Args:
        path: the folder.
        adapter: the adapter being trained (LoRA or PiSSA).
        optimizer: its optimizer (built from ``adapter.parameters()``).
        scheduler: a learning-rate scheduler, or ``None``.
        step: the number of optimizer steps taken.
        extra: small user state (``torch.load(weights_only=True)``-safe: numbers, strings,
            lists, dicts, tensors) returned by :func:`resume_training`.
        extra_meta, c: stored in the adapter file (see :func:`~modlora.save_adapter`).

    Returns:
        The folder.

    Raises:
        ValueError: a negative step, or optimizer parameters that are not the adapter's.
    """
    rng = capture_rng()  # first: nothing below may draw from the RNGs before they are saved
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    names = _param_names(adapter, optimizer)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    adapter_path, state_path = _paths(folder)
    ckpt.save_adapter(adapter, adapter_path, extra_meta=extra_meta, c=c)
    state = {
        "version": STATE_VERSION,
        "step": step,
        "adapter_digest": read_file(adapter_path).identity,
        "param_names": names,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng,
        "extra": dict(extra or {}),
    }
    ckpt.atomic_write(state_path, lambda tmp: torch.save(state, tmp))
    return folder


# ---------------------------------------------------------------------------- resume
def _read_state(path: str | os.PathLike) -> tuple[StoredFile, dict]:
    adapter_path, state_path = _paths(path)
    for p in (adapter_path, state_path):
        if not p.is_file():
            raise FileNotFoundError(f"{path} is not a training-state folder: {p.name} is missing")
    file = read_file(adapter_path)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ckpt.CheckpointError(f"{state_path}: unreadable training state: {err}") from err
    missing = {"version", "step", "adapter_digest", "param_names", "optimizer", "rng"} - set(state)
    if missing:
        raise ckpt.CheckpointError(f"{state_path}: missing entries {sorted(missing)}")
    if state["version"] > STATE_VERSION:
        raise ckpt.CheckpointError(
            f"{state_path}: training-state version {state['version']} is newer than this "
            f"modlora supports ({STATE_VERSION})"
        )
    if state["adapter_digest"] != file.identity:
        raise ckpt.CheckpointError(
            f"{state_path} does not belong to {adapter_path.name} (different adapter tensors: "
            "an interrupted save, or files copied from two runs)"
        )
    return file, state


def resume_training(
    path: str | os.PathLike,
    adapter: LowRankAdapter,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    rng: bool = True,
) -> TrainingState:
    """Continue a run: load weights, optimizer, scheduler and RNG states saved at ``path``.

    ``adapter``, ``optimizer`` and ``scheduler`` are built as at the start of the run (same
    config, same parameter order). Everything is checked before anything is loaded. The adapter
    is left in training mode. The RNG states are restored last, and :func:`save_training_state`
    captures them first, so call them right where the loop stops and restarts: anything that
    draws random numbers in between (data shuffling, a type checker sampling containers) is
    not part of the saved stream.

    Args:
        path: a folder written by :func:`save_training_state`.
        adapter: an adapter of the same kind and config (fresh, or from ``load_adapter``).
        optimizer: built from ``adapter.parameters()`` in the original order.
        scheduler: the scheduler, if the run had one.
        rng: restore the RNG states (default; needed for an identical continuation).

    Returns:
        :class:`TrainingState` with the step to continue from and the saved ``extra``.

    Raises:
        FileNotFoundError: not a training-state folder.
        CheckpointError: unreadable or mismatched files.
        ValueError: the adapter's config, the optimizer's parameters or the scheduler's
            presence differ from the saved run (all differences listed).
    """
    file, state = _read_state(path)
    saved = ckpt.read_metadata(file.path)
    mine = _config(adapter)
    theirs = {k: saved.get(k) for k in mine}
    differ = [f"{k}: saved {theirs[k]}, given {mine[k]}" for k in mine if theirs[k] != mine[k]]
    if differ:
        raise ValueError(f"the adapter does not match the saved run at {path}: {differ}")
    names = _param_names(adapter, optimizer)
    if names != state["param_names"]:
        raise ValueError(
            f"the optimizer's parameters differ from the saved run's: saved groups "
            f"{[len(g) for g in state['param_names']]}, given {[len(g) for g in names]} "
            "(build the optimizer from adapter.parameters(), in the same order)"
        )
    if (scheduler is None) != (state.get("scheduler") is None):
        saved = "had" if state.get("scheduler") is not None else "had no"
        raise ValueError(f"the saved run {saved} scheduler; pass the same (or none)")
    adapter.load_target_tensors(
        group_tensors(file.tensors, kind_class(saved["kind"]).roles, file.path)
    )
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    adapter.deployed_c, adapter.extra_meta = saved.get("c"), saved.get("extra_meta") or {}
    adapter.train()
    out = TrainingState(step=int(state["step"]), path=Path(path), extra=state.get("extra") or {})
    if rng:
        restore_rng(state["rng"])  # last: nothing after this may draw from the RNGs
    return out


# ---------------------------------------------------------------------------- fork
def fork_training(path: str | os.PathLike, model: nn.Module, **load_kwargs) -> LowRankAdapter:
    """Start a new run from saved weights only (no optimizer, scheduler or RNG state).

    Args:
        path: a training-state folder or an adapter ``.safetensors`` file.
        model: the base model of the new run.
        **load_kwargs: passed to :func:`~modlora.load_adapter` (``check_base``...).

    Returns:
        The adapter in training mode, its ``extra_meta["forked_from"]`` naming the source.

    Raises:
        ValueError: the checkpoint holds a frozen history (nothing to train).
    """
    source = Path(path)
    step = None
    if source.is_dir():
        _, state = _read_state(source)
        step, source = int(state["step"]), source / ADAPTER_FILE
    kind = ckpt.read_metadata(source).get("kind", "lora")
    if kind == "history":
        raise ValueError(f"{source} holds a frozen HistoryBake: there is nothing to train")
    adapter = ckpt.load_adapter(model, source, **load_kwargs)
    adapter.extra_meta = {
        **adapter.extra_meta,
        "forked_from": {"path": str(Path(path)), "step": step},
    }
    return adapter.train()
