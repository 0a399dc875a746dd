"""The files of a training-state folder: what ``training_state.pt`` holds, written and checked.

``training_state.pt`` (``torch.save``, loadable with ``weights_only=True``): ``version``,
``step``, ``adapter_digest`` (the tensor digest of ``adapter.safetensors``, by
``digest_method``; states without it used the file's legacy identity), ``param_names``,
``optimizer`` / ``optimizer_class``, ``scheduler`` / ``scheduler_class``, ``rng`` and the
user's ``extra``. Every entry is checked on read, so a malformed state raises
:class:`~modlora.checkpoint.CheckpointError` naming the file and the entry.
"""

import io
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .checkpoint.io import StoredFile, as_path, legacy_identity, read_file

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
STATE_VERSION = 1
DIGEST_METHOD = "tensors-sha256"
"""How ``adapter_digest`` was computed (states without it used the legacy file identity)."""
_ENTRIES = {  # entry: (check, what it must be)
    "version": (lambda v: count(v) and 1 <= v <= STATE_VERSION, f"an int in [1, {STATE_VERSION}]"),
    "step": (lambda v: count(v), "a non-negative int"),
    "adapter_digest": (lambda v: isinstance(v, str), "a str"),
    "param_names": (
        lambda v: (
            isinstance(v, list)
            and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in v)
        ),
        "a list of lists of names",
    ),
    "optimizer": (
        lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list),
        "an optimizer state dict",
    ),
    "scheduler": (lambda v: v is None or isinstance(v, dict), "a state dict or None"),
    "rng": (lambda v: isinstance(v, dict) and "torch" in v and "python" in v, "RNG states"),
    "extra": (lambda v: isinstance(v, dict), "a dict"),
}


def count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def class_name(obj) -> str | None:
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


def paths(path) -> tuple[Path, Path]:
    folder = as_path(path)
    return folder / ADAPTER_FILE, folder / STATE_FILE


def serialised(state: dict) -> bytes:
    """``state`` as ``torch.save`` bytes, proven to load back with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    except Exception as err:
        raise TypeError(
            "the training state would not load back (torch.load(weights_only=True)): `extra` "
            f"may hold only numbers, strings, lists, dicts and tensors ({err})"
        ) from None
    return buffer.getvalue()


def read_state(path) -> tuple[StoredFile, dict]:
    adapter_path, state_path = paths(path)
    for p in (adapter_path, state_path):
        if not p.is_file():
            raise FileNotFoundError(f"{path} is not a training-state folder: {p.name} is missing")
    file = read_file(adapter_path)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ckpt.CheckpointError(f"{state_path}: unreadable training state: {err}") from err
    if not isinstance(state, dict):
        raise ckpt.CheckpointError(f"{state_path}: not a training state (not a dict)")
    missing = sorted(set(_ENTRIES) - {"scheduler", "extra"} - set(state))
    if missing:
        raise ckpt.CheckpointError(f"{state_path}: missing entries {missing}")
    if count(state["version"]) and state["version"] > STATE_VERSION:
        raise ckpt.CheckpointError(
            f"{state_path}: training-state version {state['version']} is newer than this "
            f"modlora supports ({STATE_VERSION})"
        )
    for key, (ok, want) in _ENTRIES.items():
        if key in state and not ok(state[key]):
            raise ckpt.CheckpointError(
                f"{state_path}: entry {key!r} is malformed: expected {want}, got "
                f"{type(state[key]).__name__} {state[key]!r:.80}"
            )
    digest = file.identity if state.get("digest_method") == DIGEST_METHOD else None
    if state["adapter_digest"] != (digest or legacy_identity(adapter_path)):
        raise ckpt.CheckpointError(
            f"{state_path} does not belong to {adapter_path.name} (different adapter tensors: "
            "an interrupted save, or files copied from two runs)"
        )
    return file, state


def _check_same_kind_of(saved: str | None, given, what: str) -> None:
    if saved is not None and saved != class_name(given):
        raise ValueError(
            f"the saved run's {what} is a {saved}, the one given a {class_name(given)}: its "
            f"state would not fit (build the same {what} class as the saved run)"
        )


def _check_groups(saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """The saved param groups have the given optimizer's hyper-parameter keys."""
    for i, (old, new) in enumerate(zip(saved["param_groups"], optimizer.param_groups, strict=True)):
        if set(old) - {"params"} != set(new) - {"params"}:
            raise ValueError(
                f"the saved optimizer state does not fit this optimizer: group {i} has keys "
                f"{sorted(set(old) - {'params'})}, the optimizer {sorted(set(new) - {'params'})}"
            )


def check_optimizer(state: dict, optimizer, scheduler) -> None:
    """The given optimizer and scheduler can take the saved states (classes, group keys)."""
    if (scheduler is None) != (state.get("scheduler") is None):
        had = "had" if state.get("scheduler") is not None else "had no"
        raise ValueError(f"the saved run {had} scheduler; pass the same (or none)")
    _check_same_kind_of(state.get("optimizer_class"), optimizer, "optimizer")
    _check_same_kind_of(state.get("scheduler_class"), scheduler, "scheduler")
    _check_groups(state["optimizer"], optimizer)
