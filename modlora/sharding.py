"""What modlora needs to know about a multi-process run: ranks, FSDP2 shards, and who writes files.

Torch-level helpers only (no other modlora module is imported here), so the checkpoint, merge
and attach code can ask "is this tensor a shard?" without an import cycle.

* Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter outside a forward is a
  ``DTensor`` holding this rank's shard. :func:`full_tensor` gathers it — a *collective*: every
  rank must make the same calls in the same order, or the run hangs.
* A file is written by rank 0 of the default process group alone (:func:`write_on_rank0`).
"""

import sys

import torch
from torch import Tensor, nn


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard outside the forward)."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before its import
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or the whole tensor of a ``DTensor`` (an all-gather: a collective)."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` as a ``DTensor`` placed like ``like`` when that is one (for an in-place copy
    into a sharded parameter; every rank holds ``whole``), else ``whole`` itself."""
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def any_sharded(tensors) -> bool:
    """True when any tensor of the iterable is a ``DTensor``."""
    return any(is_dtensor(t) for t in tensors)


def unmergeable_shard(weight) -> str:
    """Why a merge cannot write into ``weight``, an FSDP2 shard (a ``DTensor``)."""
    return (
        f"its weight is sharded by FSDP2 (a DTensor, {weight.placements} over "
        f"{weight.device_mesh.size()} ranks): this process holds only a slice of it. Merge on an "
        "unsharded model (e.g. load the saved adapter in one process) or offline with "
        "merge_checkpoint"
    )


def process_group_size() -> int:
    """World size of the default process group (1 when torch.distributed is not initialised)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def process_rank() -> int:
    """This process's rank in the default process group (0 when not initialised)."""
    if process_group_size() == 1:
        return 0
    return torch.distributed.get_rank()


def fsdp_owner(model: nn.Module, name: str) -> str | None:
    """Name of the module ``fully_shard`` was applied to that holds layer ``name`` (the nearest
    one: the layer itself, one of its ancestors, or ``""`` for the root), or ``None``."""
    module = sys.modules.get("torch.distributed.fsdp")
    if module is None:
        return None  # fully_shard was never imported, so never applied
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        prefix = ".".join(parts[:depth])
        try:
            owner = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(owner, module.FSDPModule):
            return prefix
    return None


def write_on_rank0(write, path, collective: bool):
    """Run ``write()`` on rank 0 only; return ``path`` on every rank.

    Args:
        write: writes the file (called on rank 0; on every process when not distributed).
        path: what every rank returns.
        collective: every rank is known to be here (the data were gathered collectively): the
            other ranks wait until rank 0 has written, and raise if rank 0 failed.
    """
    if process_group_size() == 1:
        return write()
    failure, raised = None, None
    if process_rank() == 0:
        try:
            path = write()
        except Exception as err:
            if not collective:
                raise
            failure = f"{type(err).__name__}: {err}"
            raised = err
    if collective:
        status = [failure]
        torch.distributed.broadcast_object_list(status, src=0)
        if status[0] is not None:
            if process_rank() == 0:
                raise raised
            raise RuntimeError(f"rank 0 failed to write {path}: {status[0]}")
    return path
