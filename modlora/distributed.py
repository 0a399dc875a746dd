"""Training an adapter on several processes: DDP or FSDP2, torch's own (no home-made sync).

The rules (see README, "Distributed training"):

1. **Attach, then wrap.** DDP and ``fully_shard`` take the model's parameters when they wrap it;
   an attached adapter's parameters are in the model, so they are trained and synchronised
   like any other. ``attach`` refuses an adapter that a wrapper built before it would not
   synchronise (:func:`~modlora.install.check_parallel`).
2. **Per-sample c** is per rank: each rank sets the ``c`` rows of its own batch slice.
3. **Saving** (:meth:`~modlora.LowRankAdapter.save`): rank 0 writes. Under FSDP2 the shards
   are gathered, so every rank calls ``save``; under DDP rank 0 alone may call it.
4. **Loading**: every rank loads the file into its plain model, attaches, then wraps.
5. **Merging** needs whole weights: merge after training, in one process (or offline with
   :func:`~modlora.merge_checkpoint`); a sharded weight is refused, naming FSDP2.

:func:`setup` starts the process group from the ``torchrun`` / SLURM environment and
:func:`parallelize` wraps the model; :func:`is_main_process`, :func:`barrier`,
:func:`share_from_rank0` and :func:`mean_over_ranks` are what a training script needs around them; :func:`load_into` puts a
saved adapter's tensors back into the adapter being trained (also when wrapped or sharded).

Example (``torchrun --nproc_per_node=2 train.py``)::

    info = modlora.distributed.setup()              # gloo on CPU, nccl on CUDA
    lora = ml.ModulatedLoRA(model, r=8)
    lora.attach(model, c=c_rows[info.rank])          # before wrapping
    ddp = modlora.distributed.parallelize(model, "ddp")   # or "fsdp2"
    ...train ddp...
    lora.save("adapter.safetensors")                # every rank calls; rank 0 writes
"""

import os
from dataclasses import dataclass

import torch
from loguru import logger
from torch import nn

from .blocks import find_block_list
from .checkpoint.load import read_spec
from .install import find_adapters
from .layout import unwrap_model
from .sharding import process_group_size, process_rank

STRATEGIES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process is: ``rank`` of ``world_size``, ``local_rank`` on its node, the
    ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup(backend: str | None = None) -> ProcessInfo:
    """Start the default process group from the environment ``torchrun`` sets (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a no-op when it is already
    started, or when the environment names no other process (one process, ``world_size`` 1).

    Args:
        backend: ``"gloo"`` / ``"nccl"``; default: nccl when CUDA is available, else gloo.

    Returns:
        The :class:`ProcessInfo`; on CUDA the process's device is set to ``cuda:<local_rank>``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        torch.distributed.init_process_group(backend)
        logger.info("process group: rank {} of {} ({})", process_rank(), world, backend)
    return ProcessInfo(process_rank(), process_group_size(), local_rank, device)


def is_main_process() -> bool:
    """Rank 0 of the default process group (True when not distributed)."""
    return process_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for when not distributed)."""
    if process_group_size() > 1:
        torch.distributed.barrier()


def share_from_rank0(value):
    """Rank 0's ``value`` (any picklable object) on every rank, e.g. the run folder rank 0 made
    (a collective; ``value`` itself when alone)."""
    if process_group_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float | torch.Tensor) -> float:
    """The mean of a scalar over every rank (a collective; the value itself when alone)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(())
    if process_group_size() == 1:
        return float(t)
    backend = torch.distributed.get_backend()
    t = t.to("cuda") if backend == "nccl" else t.cpu()
    torch.distributed.all_reduce(t)
    return float(t) / process_group_size()


def parallelize(model: nn.Module, strategy: str = "ddp", **kwargs) -> nn.Module:
    """Wrap a model whose adapters are attached for multi-process training.

    Args:
        model: the plain model, with the adapter(s) to train attached (``attach``).
        strategy: ``"ddp"``: ``DistributedDataParallel(model, **kwargs)``; ``"fsdp2"``:
            ``fully_shard`` on every block of the model's block list, then on the root
            (``kwargs`` go to each ``fully_shard``; ``mesh`` defaults to all ranks on the
            model's device type).

    Returns:
        The module to call: the DDP wrapper, or ``model`` itself (sharded in place).

    Raises:
        ValueError: an unknown strategy, or no attached adapter with trainable parameters.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    plain = unwrap_model(model)
    trainable = [a for a in find_adapters(plain) if any(p.requires_grad for p in a.parameters())]
    if not trainable:
        raise ValueError(
            "no attached adapter with trainable parameters: attach the adapter to the model "
            "before wrapping it, so DDP / FSDP2 take its parameters with the model's"
        )
    device = next(plain.parameters()).device
    if strategy == "ddp":
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device.index])
        return nn.parallel.DistributedDataParallel(plain, **kwargs)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kwargs.setdefault("mesh", init_device_mesh(device.type, (process_group_size(),)))
    blocks = find_block_list(plain)
    if blocks is not None:
        for block in plain.get_submodule(blocks.prefix):
            fully_shard(block, **kwargs)
    fully_shard(plain, **kwargs)
    return plain


def load_into(adapter, path) -> None:
    """Copy the tensors of a file written by ``save`` into ``adapter``, in place.

    The parameters stay the same objects, so an optimizer, a DDP wrapper or FSDP2 (every rank
    loads; the whole tensors are cut into its shards) keep working on them. Nothing else is
    built: unlike :func:`~modlora.load_adapter`, no second adapter touches the model.

    Raises:
        CheckpointError: unreadable or malformed file.
        TypeError: the file holds another kind of adapter.
        KeyError, ValueError: targets, roles or shapes differ, or non-finite values (nothing is
            copied then).
    """
    spec = read_spec(path, [n for n, _ in adapter.model.named_modules()])
    if spec.kind != adapter.kind:
        raise TypeError(f"{spec.path} holds a {spec.kind!r} adapter, not a {adapter.kind!r} one")
    adapter.load_target_tensors(spec.tensors)
