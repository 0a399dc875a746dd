"""The one delta path: ``output + c · scale · (x @ A.T) @ B.T``, and the forward hook that runs it.

Every adapter kind gives, per target, factors ``(A (r, d_in), B (d_out, r), scale)``
(:meth:`~modlora.adapter.TargetPart.factors`); :func:`add_delta` adds their delta to the layer's
output without materialising ``ΔW``. It is the only place the formula is written: the hooks,
the merge's verification and ``delta_factors`` all go through the same factors.

Cost. Two kernels per call: ``h = x @ A.T`` and ``out + α · h @ B.T`` as one ``addmm`` with
``α = c · scale`` (scalar ``c``, a Python number: nothing is cached, so a factor changed through
``.data``, ``load_state_dict`` or an optimizer step is seen by the next forward). With no
gradients the add is written into the layer's own output (``addmm_``) when only modlora hooks can
have seen it. A per-sample ``c`` scales the rank-``r`` activations ``h`` by a fresh ``c · scale``
(autograd never saves the coefficient tensor itself, so ``set_coeff`` between a ``+c`` and a ``−c``
forward followed by one backward gives each forward its own ``c``). While ``torch.compile`` traces,
``c`` is read from its tensor (no recompilation when it changes). ``c == 0`` returns the base
output itself, read from a Python mirror (no device sync).
"""

import sys

import torch
import torch.nn.functional as F
from loguru import logger
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from .recompute import grad_state, no_grad_state
from .samples import per_row, row_scale


def add_delta(
    output: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float,
    c: float | Tensor,
    *,
    dropout: float = 0.0,
    inplace: bool = False,
) -> Tensor:
    """``output + c · scale · (dropout(x) @ A.T) @ B.T``.

    Args:
        output: the layer's output, ``(*lead, d_out)``.
        x: the layer's input, ``(*lead, d_in)``; cast to ``A``'s dtype.
        a: ``(r, d_in)``.
        b: ``(d_out, r)``.
        scale: the kind's static scale (LoRA ``alpha / r``; 1 otherwise).
        c: a Python number, or a tensor: 0-d, or ``(batch,)`` with batch on ``x``'s first axis.
        dropout: dropout probability on the adapter's input (0: none).
        inplace: write into ``output`` (only when nothing else can hold it, and no autograd).

    Returns:
        The adapted output, in ``output``'s dtype.
    """
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    if dropout > 0.0:
        x = F.dropout(x, dropout, training=True)
    h = F.linear(x, a)  # (*lead, r)
    if isinstance(c, Tensor):
        s = c * scale  # a fresh tensor: autograd never saves the coefficient itself
        if s.dim() == 1:
            s = row_scale(s, h)  # (rows, 1, ..., 1)
        h, alpha = h * s, 1.0
    else:
        alpha = c * scale
    if b.dtype != h.dtype:
        b = b.to(h.dtype)
    if output.dtype == h.dtype and output.is_contiguous():
        out2 = output.view(-1, output.shape[-1])  # (tokens, d_out)
        h2 = h.reshape(-1, h.shape[-1])  # (tokens, r)
        if inplace:
            out2.addmm_(h2, b.T, alpha=alpha)
            return output
        return torch.addmm(out2, h2, b.T, alpha=alpha).view(output.shape)
    delta = F.linear(h, b)  # (*lead, d_out)
    if alpha != 1.0:
        delta = delta * alpha
    return output + delta.to(output.dtype)


def current_c(adapter, device: torch.device) -> float | Tensor | None:
    """The coefficient a hook applies now: a Python number, a tensor (``(batch,)``, or 0-d while
    ``torch.compile`` traces, so changing ``c`` does not recompile), or ``None`` when the adapter
    is switched off, gated off, or at scalar ``c == 0`` (read from a Python mirror: no sync).

    In the recomputation of a gradient-checkpointed segment it is what the segment's original
    forward got, whatever happened since (:mod:`modlora.recompute`).
    """
    coeff = adapter.coefficient
    if torch.compiler.is_compiling():
        if not adapter.enabled or (adapter.gate is not None and not adapter.gate()):
            return None
        return coeff.on(device)
    applied, c = grad_state(adapter) if torch.is_grad_enabled() else no_grad_state(adapter)
    if not applied:
        return None
    if isinstance(c, Tensor):  # per-sample: the current value is on every device already
        c = coeff.on(device) if c is coeff.snapshot else c.to(device)
    return c


class DeltaHook:
    """The forward hook of one adapter on each of its target layers.

    It holds nothing but the slot name under which the adapter's part is registered in the
    layer (``layer.<slot>``), and finds everything else through the layer it is called on. So a
    ``copy.deepcopy`` of an attached model runs its own copy of the adapter, never the original,
    and under FSDP2 the hook reads the parameters FSDP has just gathered into the part.
    """

    def __init__(self, slot: str) -> None:
        self.slot = slot
        self._modlora = True  # marks the hook for owns_output

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        part = module._modules[self.slot]
        adapter = part.__dict__["_adapter"]
        c = current_c(adapter, output.device)
        if c is None:  # off, gated, or c == 0: the base output bit for bit
            return output
        x = layer_input(args, kwargs)
        if isinstance(c, Tensor) and c.dim() == 1:  # per-sample: c of each row of x
            c = per_row(part.name, x, c, adapter.batch_shape.shape, part.routed)
        a, b, scale = part.checked_factors()
        inplace = (  # no autograd, no tracing, and nothing else can hold the output
            not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and owns_output(module, self)
            and (not output.is_inference() or torch.is_inference_mode_enabled())
        )
        dropout = part.dropout if part.training else 0.0
        return add_delta(output, x, a, b, scale, c, dropout=dropout, inplace=inplace)


def layer_input(args: tuple, kwargs: dict) -> Tensor:
    """The input of a linear layer's call: ``layer(x)``, ``layer(input=x)`` (``nn.Linear``) or
    ``layer(x=x)`` (GPT-2's ``Conv1D``) — their forward takes that one argument."""
    return args[0] if args else next(iter(kwargs.values()))


def owns_output(module: nn.Module, hook) -> bool:
    """True when no code but modlora hooks can have seen ``module``'s output before ``hook``.

    Then ``hook`` may add its delta in place; otherwise a hook registered earlier (or a global
    forward hook) might hold the base output, and it must not change under it.
    """
    if _module_globals._global_forward_hooks:
        return False
    for other in module._forward_hooks.values():
        if other is hook:
            return True
        if not getattr(other, "_modlora", False):
            return False
    return False


def let_compiled_code_see_hooks() -> None:
    """Make dynamo guard on module hooks, resetting code compiled without those guards (once).

    Called at every attach and detach. Dynamo skips guards on module hooks by default, so code
    compiled before an attach would ignore the adapter and code compiled while attached would
    keep applying it after a detach.
    """
    config = sys.modules.get("torch._dynamo.config")
    if config is None or not config.skip_nnmodule_hook_guards:
        return  # dynamo never loaded (nothing compiled), or the guards are already on
    config.skip_nnmodule_hook_guards = False
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    if counters is not None and not counters["frames"]["ok"]:
        return  # nothing compiled yet: every later compilation guards on the hooks
    torch.compiler.reset()
    logger.info(
        "modlora: turned on torch.compile's guards on module hooks and reset compiled code, so "
        "compiled models see adapters attach and detach (they recompile once)"
    )
