"""Putting an adapter into its model and taking it out again: parts and hooks in the layers.

While attached, each target layer holds the adapter's part as ``layer.<slot>`` and a
:class:`~modlora.hooks.DeltaHook` that finds the part under that slot. Either both are in place
on every target, or (after a failure half-way) neither is on any.
"""

from torch import nn

from .hooks import DeltaHook
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
        if parts[target.name].on_meta and target.device.type != "meta":
            raise AdapterStateError(
                f"{what} holds no values (its tensors are on the meta device) but "
                f"{target.name!r} computes on {target.device}: call adapter.to_empty(device=...) "
                "then adapter.reset_parameters() (or load_state_dict) first"
            )


def install(layout: TargetLayout, parts: Parts, hook: DeltaHook) -> list:
    """Register each part as ``layer.<hook.slot>`` and ``hook`` on each layer; the handles."""
    handles = []
    try:
        for target in layout:
            target.module.register_module(hook.slot, parts[target.name])
            handles.append(target.module.register_forward_hook(hook))
    except BaseException:
        uninstall(layout, hook.slot, handles)
        raise
    return handles


def uninstall(layout: TargetLayout, slot: str, handles: list) -> None:
    """Remove the hooks and the parts registered under ``slot``."""
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
