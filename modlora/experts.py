"""Fused MoE expert weights: which 3-D parameters they are, and how they are stored.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V3 …
as 3-D parameters of one experts module (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``):
``(E, d_out, d_in)`` used with ``F.linear`` (Mixtral, Qwen3-MoE, OLMoE) or ``(E, d_in, d_out)``
used with ``x @ W`` (GPT-OSS). A parameter is a fused expert weight when it is 3-D, floating
(or quantized), and its first axis is the module's ``num_experts``.

The storage orientation is never guessed: it is the module's own declaration
(``is_transposed``, set by transformers' experts integration), verified against the model's
hidden width (the experts' first projection reads it, their last writes it). A fused weight
whose orientation cannot be established raises, naming the weight.
"""

import torch
from torch import Tensor, nn

from .hooks import current_c
from .samples import per_row, rows_by_value


def fused_expert_params(module: nn.Module) -> list[str]:
    """Names of ``module``'s own fused expert weights (3-D, first axis ``num_experts``)."""
    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int) or experts < 1:
        return []
    return [
        name
        for name, p in module.named_parameters(recurse=False)
        if p.dim() == 3 and p.shape[0] == experts
    ]


def hidden_size(model: nn.Module) -> int | None:
    """The model's hidden width from its (text) config, or ``None`` if it has no config."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    text = getter() if callable(getter) else config
    value = getattr(text, "hidden_size", None)
    return value if isinstance(value, int) else None


def expert_geometry(
    name: str, module: nn.Module, param: str, hidden: int | None
) -> tuple[int, int, bool, int]:
    """``(d_in, d_out, transposed, experts)`` of fused weight ``param`` of ``module``.

    Raises:
        ValueError: the module declares no orientation (``is_transposed``), or the declared one
            contradicts the model's hidden width. The message names the weight.
    """
    weight = getattr(module, param)
    experts, a, b = (int(n) for n in weight.shape)
    declared = getattr(module, "is_transposed", None)
    if not isinstance(declared, bool):
        raise ValueError(
            f"cannot establish the storage orientation of fused expert weight {name!r} "
            f"{tuple(weight.shape)}: {type(module).__name__} declares no is_transposed "
            "((E, d_out, d_in) for F.linear, or (E, d_in, d_out) for x @ W); set "
            f"module.is_transposed, or exclude {name!r}"
        )
    d_in, d_out = (a, b) if declared else (b, a)
    if hidden is not None and hidden not in (d_in, d_out):
        raise ValueError(
            f"fused expert weight {name!r} {tuple(weight.shape)} with is_transposed={declared} "
            f"reads (d_in={d_in}) and writes (d_out={d_out}) neither of the model's hidden "
            f"width {hidden}: its orientation is not what {type(module).__name__} declares"
        )
    return d_in, d_out, declared, experts


class ExpertsDeltaHook:
    """The hooks of one adapter on an experts module: while it runs, each adapted fused weight
    reads ``W + c · scale · B @ A`` (per expert, in its stored layout), whatever experts
    implementation the module dispatches to (eager loop, batched or grouped matmul).

    ``pre`` puts the adapted weights in the module's ``__dict__`` (shadowing its parameters,
    differentiable in the adapter's factors), ``post`` removes them — also when the forward
    raises. Several adapters stack: each adds its delta to what the one before left. A
    per-sample ``c`` runs the module once per distinct value on that value's tokens.
    """

    def __init__(self, slot: str) -> None:
        self.slot = slot
        self._modlora = True

    def _parts(self, module: nn.Module):
        return module._modules[self.slot].named_children()

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        parts = list(self._parts(module))
        adapter = parts[0][1].adapter
        c = current_c(adapter, getattr(module, parts[0][0]).device)
        if c is None or (isinstance(c, Tensor) and c.dim() == 1):
            return  # off, c == 0 (nothing to add), or per-sample (post runs each value)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            adapter.note_grad_forward()
        substitute(module, parts, c)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output):
        parts = list(self._parts(module))
        for param, _ in parts:
            module.__dict__.pop(param, None)
        adapter = parts[0][1].adapter
        c = current_c(adapter, getattr(module, parts[0][0]).device)
        if not (isinstance(c, Tensor) and c.dim() == 1):
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        c_rows = per_row(parts[0][1].name, x, c, adapter.batch_shape.shape, routed=False)
        out = output.clone()
        for value, rows in rows_by_value(c_rows):
            if value == 0.0:
                continue  # those tokens keep the base output
            sub_args = [a[rows] if _per_token(a, x) else a for a in args]
            sub_kwargs = {k: v[rows] if _per_token(v, x) else v for k, v in kwargs.items()}
            substitute(module, parts, value)
            try:
                out[rows] = module.forward(*sub_args, **sub_kwargs)
            finally:
                for param, _ in parts:
                    module.__dict__.pop(param, None)
        return out


def _per_token(value, x: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == x.shape[0]


def substitute(module: nn.Module, parts, c) -> None:
    """Shadow each fused weight ``W`` of ``module`` with ``W + c · scale · B @ A``."""
    for param, part in parts:
        weight = getattr(module, param)  # the parameter, or what an earlier adapter left
        a, b, scale = part.checked_factors()  # (E, r, d_in), (E, d_out, r)
        # stored (E, d_out, d_in): add B A; stored (E, d_in, d_out): add (B A)ᵀ = Aᵀ Bᵀ
        left, right = (a.mT, b.mT) if part.transposed else (b, a)
        module.__dict__[param] = add_to_weight(weight, left, right, scale, c)


def add_to_weight(weight: Tensor, left: Tensor, right: Tensor, scale: float, c) -> Tensor:
    """``weight + c · scale · left @ right`` (batched), accumulated in the factors' dtype."""
    if isinstance(c, Tensor):  # traced by torch.compile: c stays a tensor input
        delta = torch.bmm(left, right) * (c * scale)
        return weight + delta.to(weight.dtype)
    base = weight if weight.dtype == left.dtype else weight.to(left.dtype)
    return torch.baddbmm(base, left, right, alpha=c * scale).to(weight.dtype)
