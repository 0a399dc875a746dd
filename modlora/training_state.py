"""Save, resume and fork a training run: adapter + optimizer + scheduler + step + RNG states.

A training-state checkpoint is a folder:

========================  ==========================================================================
``adapter.safetensors``   the adapter (:mod:`modlora.checkpoint` format; loads on its own)
``training_state.pt``     optimizer and scheduler state dicts, step, RNG states (torch CPU, CUDA,
                          Python ``random``, NumPy's global generator), the optimizer's parameter
                          names, and the digest of the adapter tensors it belongs to
========================  ==========================================================================

The folder is written whole and swapped in at once (:func:`~modlora.checkpoint.write_folder`),
so a failed or killed save leaves the previous state as it was. The state file records the
digest of the adapter tensors it belongs to, and the optimizer's and scheduler's classes;
:func:`resume_training` checks them, and the adapter file as the loader does, before it loads
anything.

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

import copy
import json
import os
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import checks
from .adapter import LowRankAdapter
from .checkpoint.folder import write_folder
from .checkpoint.io import as_path, read_file
from .checkpoint.load import read_spec
from .checkpoint.spec import metadata_of
from .checkpoint.validate import check_base, check_model, check_tensors
from .rng import capture_rng, restore_rng
from .state_file import (
    ADAPTER_FILE,
    DIGEST_METHOD,
    STATE_FILE,
    STATE_VERSION,
    check_optimizer,
    class_name,
    read_state,
    serialised,
)

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


def _config(adapter: LowRankAdapter) -> dict:
    """The adapter's configuration as :func:`~modlora.read_metadata` would decode it."""
    meta = metadata_of(adapter, {}, None)
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
    """Write a training-state folder that :func:`resume_training` reads.

    The folder is written whole and swapped in only when complete
    (:func:`~modlora.checkpoint.write_folder`): a failed or killed save leaves the previous
    state at ``path`` as it was. ``path`` may be a new folder, an empty one, or an earlier
    training state; a folder holding anything else is never replaced.

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
        TypeError: ``extra`` that would not load back. Nothing is written in either case.
        FileExistsError: ``path`` holds something that is not a training state.
    """
    rng = capture_rng()  # first: nothing below may draw from the RNGs before they are saved
    step = checks.scalar(step)
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    names = _param_names(adapter, optimizer)
    state = {
        "version": STATE_VERSION,
        "step": int(step),
        "digest_method": DIGEST_METHOD,
        "adapter_digest": "",
        "param_names": names,
        "optimizer": optimizer.state_dict(),
        "optimizer_class": class_name(optimizer),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scheduler_class": class_name(scheduler),
        "rng": rng,
        "extra": dict(extra or {}),
    }
    serialised(state)  # refuse an unloadable state before anything is written

    def write(tmp: Path) -> None:
        ckpt.save_adapter(adapter, tmp / ADAPTER_FILE, extra_meta=extra_meta, c=c)
        state["adapter_digest"] = read_file(tmp / ADAPTER_FILE).identity
        (tmp / STATE_FILE).write_bytes(serialised(state))

    return write_folder(
        path,
        write,
        overwrite=True,
        writer="save_training_state",
        legacy=lambda files: files <= {ADAPTER_FILE, STATE_FILE},
    )


# ---------------------------------------------------------------------------- resume
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
    config, same classes, same parameter order). The adapter file goes through the loader's own
    checks (tensors, model fit, base weights by the kind's policy), and everything is checked
    before anything is loaded; a failure while loading puts the adapter, optimizer and
    scheduler back as they were. The adapter is left in training mode. The RNG states are
    restored last, and :func:`save_training_state` captures them first, so call them right where
    the loop stops and restarts: anything that draws random numbers in between is not part of
    the saved stream.

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
        CheckpointError: unreadable, malformed or mismatched files, or (PiSSA) another base.
        ValueError: the adapter's config, the optimizer's class or parameters, or the
            scheduler's class or presence differ from the saved run (differences listed).
    """
    file, state = read_state(path)
    spec = read_spec(file.path, [n for n, _ in adapter.model.named_modules()])
    check_tensors(spec)
    check_model(spec, adapter.model)
    check_base(spec, adapter.model, spec.cls.base_check)
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
    check_optimizer(state, optimizer, scheduler)

    before = (
        {
            n: {r: t.detach().clone() for r, t in p.items()}
            for n, p in adapter.target_tensors().items()
        },
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
    )
    try:
        adapter.load_target_tensors({n: spec.tensors[n] for n in adapter.target_tensors()})
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
    except BaseException:
        adapter.load_target_tensors(before[0])
        optimizer.load_state_dict(before[1])
        if scheduler is not None:
            scheduler.load_state_dict(before[2])
        raise
    adapter.deployed_c, adapter.extra_meta = spec.c, spec.extra_meta
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
    source = as_path(path)
    step = None
    if source.is_dir():
        _, state = read_state(source)
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
