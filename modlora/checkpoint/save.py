"""Write an adapter to one ``.safetensors`` file (format v1, :mod:`modlora.checkpoint.spec`)."""

import os
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from .._types import Coeff
from ..coefficient import validate_coeff
from ..kinds import KINDS
from ..sharding import any_sharded, process_rank, write_on_rank0
from .io import as_path
from .spec import file_tensors, metadata_of
from .write import atomic_write, destination


def save_adapter(
    adapter,
    path: str | os.PathLike,
    extra_meta: Mapping | None = None,
    c: Coeff | None = None,
) -> Path:
    """Write ``adapter`` to one ``.safetensors`` file, atomically (format v1).

    Args:
        adapter: an adapter of a registered kind (LoRA, PiSSA, history...).
        path: the destination file (a symlink stays: the file it points to is replaced).
        extra_meta: user metadata that JSON stores exactly (``str`` keys, lists, numbers,
            strings; unicode kept); default: the adapter's own ``extra_meta`` (so a loaded
            adapter re-saves with its metadata).
        c: the calibrated / deployed coefficient; default: ``adapter.deployed_c``.

    Returns:
        The path written.

    Raises:
        TypeError: an unregistered adapter kind, or ``extra_meta`` that would not come back
            from the file as given (a tuple, a non-``str`` key, an object...: the message
            names where).
        ValueError: a non-finite ``c`` or non-finite adapter tensors (nothing is written).

    In a multi-process run (``torch.distributed`` initialised) rank 0 alone writes; every rank
    returns the path. Under FSDP2 the adapter's shards and the base weights (for their
    fingerprints) are gathered, a collective: call it on every rank; it returns once rank 0 has
    written (and raises on every rank if rank 0 failed). Unsharded (DDP), calling it on rank 0
    alone is fine too.
    """
    sharded = any_sharded(
        [t for ts in adapter.target_tensors().values() for t in ts.values()]
        + [target.weight for target in adapter.layout]  # fingerprinted
    )
    if not sharded and process_rank() == 0:
        destination(path)  # early; under FSDP2 rank 0 must first join the gathers
    kind = getattr(adapter, "kind", None)
    if KINDS.get(kind) is not type(adapter):
        raise TypeError(f"cannot save a {type(adapter).__name__}: kinds are {sorted(KINDS)}")
    extra_meta = adapter.extra_meta if extra_meta is None else extra_meta
    if not isinstance(extra_meta, Mapping):
        raise TypeError(f"extra_meta must be a dict, got {type(extra_meta).__name__}")
    c = adapter.deployed_c if c is None else c
    if c is not None:
        c = validate_coeff(c)
        if not isinstance(c, float):
            raise ValueError("the deployed c stored in a checkpoint must be a scalar")
    tensors = file_tensors(adapter)
    bad = sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"refusing to save non-finite adapter tensors: {bad}")
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) > 1:  # one dtype per file: the loader would refuse the others
        odd = sorted(f"{k}: {v.dtype}" for k, v in tensors.items() if v.dtype != adapter.dtype)
        raise ValueError(
            f"refusing to save an adapter whose tensors mix dtypes {sorted(map(str, dtypes))}: "
            f"{odd[:4]}{'...' if len(odd) > 4 else ''}; cast it whole (adapter.to(dtype)) first"
        )
    metadata = metadata_of(adapter, dict(extra_meta), c, tensors)

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)

    return write_on_rank0(lambda: atomic_write(path, write), as_path(path), collective=sharded)
