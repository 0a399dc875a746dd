"""One adapted weight: :class:`Target` — a linear layer (``nn.Linear``, GPT-2's ``Conv1D``) or
one fused 3-D expert weight — with its widths, storage orientation and device.
"""

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .experts import expert_geometry


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with weight ``(d_in, d_out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_target_type(module: nn.Module) -> bool:
    """True for the layer types an adapter can attach to."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def returns_tuple(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass whose ``forward`` is declared to return a tuple — a MoE router
    such as PhiMoE's ``PhimoeTopKRouter`` (``(logits, weights, experts)``): its output is not
    the layer's ``x Wᵀ``, so no delta can be added to it."""
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return False
    try:
        annotation = inspect.signature(forward).return_annotation
    except (TypeError, ValueError):
        return False
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return annotation is tuple or text.startswith(("tuple[", "typing.Tuple", "Tuple["))


def is_quantized(module: nn.Module) -> bool:
    """True when the layer's weight is not a dense float tensor (bitsandbytes 4/8-bit, ...)."""
    return is_quantized_weight(module.weight)


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """True for a weight that is not a dense float tensor."""
    return (
        type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point
    )


def execution_device(module: nn.Module, weight: torch.Tensor | None = None) -> torch.device:
    """Where ``module`` computes: its weight's device, or accelerate's execution device when
    the weight is offloaded (kept on ``meta`` between forwards)."""
    device = (module.weight if weight is None else weight).device
    if device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        target = getattr(hook, "execution_device", None)
        if target is not None:
            return torch.device(target)
    return device


@dataclass(frozen=True)
class Target:
    """One adapted weight: a linear layer, or one fused 3-D expert weight.

    Attributes:
        name: the layer's qualified name (``model.layers.3.self_attn.q_proj``), or for a fused
            expert weight the parameter's (``model.layers.3.mlp.experts.gate_up_proj``).
        module: the layer, or the experts module holding the fused weight.
        d_in: input width.
        d_out: output width.
        block: index in the model's block list, or ``None`` outside it.
        transposed: weight stored ``(d_in, d_out)`` (GPT-2 ``Conv1D``; experts ``(E, d_in, d_out)``).
        quantized: weight is not a dense float tensor.
        param: the fused weight's parameter name in ``module`` (``None`` for a linear layer).
        experts: the number of experts ``E`` of a fused weight (``None`` for a linear layer).
        routed: a linear layer inside an expert list: its inputs are the tokens routed to it.
    """

    name: str
    module: nn.Module = field(compare=False, repr=False)
    d_in: int
    d_out: int
    block: int | None
    transposed: bool = False
    quantized: bool = False
    param: str | None = None
    experts: int | None = None
    routed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight (``(d_out, d_in)``, Conv1D ``(d_in, d_out)``, experts 3-D)."""
        return self.module.weight if self.param is None else getattr(self.module, self.param)

    @property
    def device(self) -> torch.device:
        """The device the layer computes on (see :func:`execution_device`)."""
        return execution_device(self.module, self.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def offloaded(self) -> bool:
        """The weight is not in memory (``meta``): a meta model, or accelerate offloading."""
        return self.weight.device.type == "meta"

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape: ``(d_out, d_in)``, or ``(E, d_out, d_in)`` for fused experts."""
        return (
            (self.d_out, self.d_in)
            if self.experts is None
            else (self.experts, self.d_out, self.d_in)
        )

    def logical(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (stored layout) as a view in the logical layout :attr:`shape`."""
        return weight.transpose(-2, -1) if self.transposed else weight

    def dense_weight(self) -> torch.Tensor:
        """The weight in the logical layout (a view, no copy); refuses quantized or meta layers."""
        if self.quantized:
            raise TypeError(
                f"target {self.name!r} is quantized ({type(self.weight).__name__}); "
                "this operation needs the dense weight — load the base model unquantized"
            )
        if self.offloaded:
            raise TypeError(
                f"target {self.name!r} has its weight on the meta device (a meta model, or "
                "offloaded by accelerate); this operation needs the weight in memory"
            )
        return self.logical(self.weight)


def make_target(name: str, module: nn.Module, block: int | None, routed: bool = False) -> Target:
    """The :class:`Target` of one linear layer."""
    transposed = is_conv1d(module)
    if transposed:
        d_in, d_out = module.weight.shape  # Conv1D stores (d_in, d_out)
    else:
        d_in, d_out = module.in_features, module.out_features
    return Target(
        name=name,
        module=module,
        d_in=int(d_in),
        d_out=int(d_out),
        block=block,
        transposed=transposed,
        quantized=is_quantized(module),
        routed=routed,
    )


def expert_target(
    name: str, module: nn.Module, param: str, block: int | None, hidden: int | None
) -> Target:
    """The :class:`Target` of fused expert weight ``param`` of ``module`` (see
    :mod:`modlora.experts`)."""
    d_in, d_out, transposed, experts = expert_geometry(name, module, param, hidden)
    return Target(
        name=name,
        module=module,
        d_in=d_in,
        d_out=d_out,
        block=block,
        transposed=transposed,
        quantized=is_quantized_weight(getattr(module, param)),
        param=param,
        experts=experts,
    )


def is_routed(name: str, modules: dict[str, nn.Module]) -> bool:
    """A layer inside an expert list (``...experts.3.w1``, ``...experts.expert_0.wi``): its
    inputs are only the tokens the router sent to that expert."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        ancestor = ".".join(parts[:i])
        if "expert" in parts[i - 1].lower() and isinstance(
            modules.get(ancestor), nn.ModuleList | nn.ModuleDict
        ):
            return True
    return False
