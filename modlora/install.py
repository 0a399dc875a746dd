"""Putting an adapter into its model and taking it out again: parts and hooks in the layers.

While attached, each target layer holds the adapter's part as ``layer.<slot>`` and a
:class:`~modlora.hooks.DeltaHook` that finds the part under that slot. Either both are in place
on every target, or (after a failure half-way) neither is on any.
"""

from torch import nn

from .layout import TargetLayout, unwrap_model
from .part import AdapterStateError, Parts, TargetPart


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
        a = parts[target.name].factors()[0]
        if a.device.type == "meta" and target.device.type != "meta":
            raise AdapterStateError(
                f"{what} holds no values (its tensors are on the meta device) but "
                f"{target.name!r} computes on {target.device}: call adapter.to_empty(device=...) "
                "then adapter.reset_parameters() (or load_state_dict) first"
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
                handles.append(module.register_forward_hook(linear_hook))
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
