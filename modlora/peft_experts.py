"""PEFT's ``target_parameters`` layout for fused expert weights, both ways.

PEFT wraps an experts module once per targeted parameter (``lora.ParamWrapper``), in the order
the module registers its parameters, so the last one is outermost: with ``gate_up_proj`` and
``down_proj`` targeted, ``<experts>.lora_A.weight`` belongs to ``down_proj`` and
``<experts>.base_layer.lora_A.weight`` to ``gate_up_proj``. Per expert ``e`` its factors are rows
``e·r … (e+1)·r`` of ``lora_A`` ``(E·r, d_in)`` and columns ``e, E + e, 2E + e, …`` of ``lora_B``
``(d_out, r·E)`` (PEFT reshapes ``lora_B`` to ``(d_out, r, E)``), whatever the weight's stored
orientation.
"""

import re

from torch import Tensor, nn

BASE_LAYER = "base_layer."


def key_stems(layout) -> dict[str, str]:
    """``{fused target name: PEFT key stem}`` (``<module>.(base_layer.)*``) of a layout."""
    by_module: dict[str, list[str]] = {}
    for t in layout:
        if t.param is not None:
            by_module.setdefault(t.name.rpartition(".")[0], []).append(t.name)
    stems = {}
    for module_name, names in by_module.items():
        owner = layout[names[0]].module
        order = [p for p, _ in owner.named_parameters(recurse=False)]  # PEFT's wrapping order
        targeted = sorted(names, key=lambda n: order.index(n.rpartition(".")[2]))
        for i, name in enumerate(targeted):
            stems[name] = f"{module_name}.{BASE_LAYER * (len(targeted) - 1 - i)}"
    return stems


def to_peft(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``A (E, r, d_in)``, ``B (E, d_out, r)`` → PEFT's ``lora_A (E·r, d_in)``, ``lora_B (d_out, r·E)``."""
    experts, r, d_in = a.shape
    lora_a = a.reshape(experts * r, d_in)  # (E·r, d_in), experts-major
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], r * experts)  # (d_out, r, E) → (d_out, r·E)
    return lora_a, lora_b


def from_peft(lora_a: Tensor, lora_b: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's ``lora_A (E·r, d_in)``, ``lora_B (d_out, r·E)`` → ``A (E, r, d_in)``, ``B (E, d_out, r)``."""
    if lora_a.shape[0] % experts or lora_b.shape[1] % experts:
        raise ValueError(
            f"lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not split into "
            f"{experts} experts"
        )
    r = lora_a.shape[0] // experts
    a = lora_a.reshape(experts, r, lora_a.shape[1])  # (E, r, d_in)
    b = lora_b.reshape(lora_b.shape[0], r, experts).permute(2, 0, 1)  # (E, d_out, r)
    return a.contiguous(), b.contiguous()


def split_stem(name: str) -> tuple[str, int]:
    """``"<module>.base_layer.base_layer"`` → ``("<module>", 2)``: the wrapped module and depth."""
    depth = 0
    while name.endswith("." + BASE_LAYER.rstrip(".")):
        name, depth = name[: -len(BASE_LAYER)], depth + 1
    return name, depth


def resolve_stem(
    module_name: str, depth: int, target_parameters, modules: dict[str, nn.Module]
) -> str | None:
    """The fused weight that PEFT's wrapper at ``depth`` around ``module_name`` adapts, or
    ``None`` when the module has no targeted parameter (an ordinary ``target_modules`` layer)."""
    module = modules.get(module_name)
    if module is None or not target_parameters:
        return None
    order = [p for p, _ in module.named_parameters(recurse=False)]
    targeted = [
        p
        for p in order
        if any(
            re.fullmatch(rf"(.*\.)?{re.escape(key)}", f"{module_name}.{p}")
            for key in target_parameters
        )
    ]
    if not targeted:
        return None
    if depth >= len(targeted):
        raise ValueError(
            f"a PEFT key is nested {depth} wrappers deep around {module_name!r}, which has only "
            f"{len(targeted)} targeted parameter(s) {targeted}"
        )
    return f"{module_name}.{targeted[len(targeted) - 1 - depth]}"
