"""Putting an adapter into its model and taking it out again: parts and hooks in the layers.

While attached, each target layer holds the adapter's part as ``layer.<slot>`` and a
:class:`~modlora.hooks.DeltaHook` that finds the part under that slot. Either both are in place
on every target, or (after a failure half-way) neither is on any.
"""

from torch import nn

from .layout import TargetLayout, unwrap_model
from .part import AdapterStateError, Parts, TargetPart
from .sharding import fsdp_owner, is_dtensor


def free_slot(layout: TargetLayout, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``… : the first name no target layer uses yet."""
    modules = [t.module for t in layout]
    for n in range(1, 1000):
        slot = base if n == 1 else f"{base}_{n}"
        if not any(slot in m._modules or hasattr(m, slot) for m in modules):
            return slot
    raise AdapterStateError(f"no free attribute name for {base} on the target layers")


def check_materialised(layout: TargetLayout, parts: Parts, what: str) -> None:
    """Refuse parts still on the meta device when their layer computes on a real device."""
    for target in layout:
        if parts[target.name].on_meta and target.device.type != "meta":
            raise AdapterStateError(
                f"{what} holds no values (its tensors are on the meta device) but "
                f"{target.name!r} computes on {target.device}: call adapter.to_empty(device=...) "
                "then adapter.reset_parameters() (or load_state_dict) first"
            )


def _ddp_parameters(model: nn.Module) -> set[int] | None:
    """``id``s of the parameters a ``DistributedDataParallel`` wrapper (possibly inside a
    ``torch.compile`` wrapper) registered when it was built; ``None`` if ``model`` is none."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            registered = getattr(model, "_module_parameters", None)  # torch's own list
            return None if registered is None else {id(p) for p in registered}
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def check_parallel(model: nn.Module, layout: TargetLayout, parts: Parts, what: str) -> None:
    """Refuse trainable parameters that DDP or FSDP2 would not synchronise.

    DDP and FSDP2 take the model's parameters when they wrap / shard it; an adapter first
    attached afterwards would train on each rank alone, its gradients never averaged.

    Raises:
        AdapterStateError: ``model`` is a DDP wrapper built without the adapter's parameters, or
            a target sits in a module ``fully_shard`` was applied to while the adapter's
            parameters are not FSDP2 shards.
    """
    trainable = {
        t.name: [(role, p) for role, p in parts[t.name].named_parameters() if p.requires_grad]
        for t in layout
    }
    registered = _ddp_parameters(model)
    if registered is not None:
        missing = [
            f"{n}.{r}" for n, ps in trainable.items() for r, p in ps if id(p) not in registered
        ]
        if missing:
            raise AdapterStateError(
                f"{what}'s parameters (e.g. {missing[0]}) were not in the model when "
                "DistributedDataParallel wrapped it, so their gradients would never be averaged "
                "across ranks: attach the adapter to the plain model first, then wrap it "
                "(with-blocks on the wrapper are fine afterwards)"
            )
    plain = unwrap_model(model)
    for target in layout:
        loose = [role for role, p in trainable[target.name] if not is_dtensor(p)]
        owner = fsdp_owner(plain, target.name) if loose else None
        if owner is not None:
            raise AdapterStateError(
                f"{what} cannot train on {target.name!r}: the model is already sharded "
                f"(fully_shard on {owner or 'the root module'!r}) and the adapter's "
                f"{loose} are not among its shards, so FSDP2 would neither shard nor reduce their "
                "gradients. Attach the adapter before calling fully_shard (or, for inference "
                "only, adapter.requires_grad_(False) first)"
            )


def install(
    layout: TargetLayout, parts: Parts, hooks: tuple, model: nn.Module, batch_shape
) -> list:
    """Register the parts in the layers and the hooks on them; returns the handles.

    A linear layer holds its part as ``layer.<slot>`` and ``hooks[0]`` (a
    :class:`~modlora.hooks.DeltaHook`); an experts module holds a container ``<slot>`` with one
    part per adapted fused weight and ``hooks[1]`` (an
    :class:`~modlora.experts.ExpertsDeltaHook`) before and after its forward. The model records
    its input's ``(batch, seq)`` in ``batch_shape`` (for per-sample ``c``).
    """
    linear_hook, experts_hook = hooks
    slot = linear_hook.slot
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(batch_shape, with_kwargs=True))
        containers: dict[int, nn.Module] = {}
        for target in layout:
            module, part = target.module, parts[target.name]
            if target.param is None:
                module.register_module(slot, part)
                handles.append(module.register_forward_hook(linear_hook, with_kwargs=True))
                continue
            if id(module) not in containers:
                containers[id(module)] = nn.Module()
                module.register_module(slot, containers[id(module)])
                handles.append(module.register_forward_pre_hook(experts_hook.pre, with_kwargs=True))
                handles.append(
                    module.register_forward_hook(
                        experts_hook.post, with_kwargs=True, always_call=True
                    )
                )
            containers[id(module)].register_module(target.param, part)
    except BaseException:
        uninstall(layout, slot, handles)
        raise
    return handles


def uninstall(layout: TargetLayout, slot: str, handles: list) -> None:
    """Remove the hooks and the parts (or experts containers) registered under ``slot``."""
    for handle in handles:
        handle.remove()
    for target in layout:
        target.module._modules.pop(slot, None)


def find_adapters(model: nn.Module) -> list:
    """The adapters attached to ``model`` (e.g. the copies inside a ``deepcopy`` of it)."""
    seen: dict[int, object] = {}
    for module in unwrap_model(model).modules():
        if isinstance(module, TargetPart):
            adapter = module.adapter
            if adapter.attached:
                seen.setdefault(id(adapter), adapter)
    return list(seen.values())
