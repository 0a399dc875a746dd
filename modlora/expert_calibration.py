"""Calibration of fused expert weights: the input rows each expert really sees.

An experts module computes, for every expert ``e`` its router picked tokens for,
``W_e``'s projection of those tokens (``gate_up_proj``) and then of their activations
(``down_proj``). While calibrating, the module runs its own eager loop with each fused weight
shadowed by a :class:`Recorded` view: indexing it by an expert tags the slice, and
``F.linear`` / ``@`` with a tagged slice hands the input rows to the statistics of that expert
before computing as usual. The rows come in the eager loop's token order
(``torch.where`` over ``(top-k position, token)`` of the routing), which is how a calibration
mask over the model's tokens is applied to them.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_APPLY = {F.linear, torch.matmul, Tensor.__matmul__, Tensor.matmul}


class Recorded(Tensor):
    """A fused weight (or one expert's slice of it) that reports the rows it is applied to."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.__getitem__ and isinstance(args[0], Recorded):
            whole, index = args[0], args[1]
            out = Tensor.__getitem__(whole.as_subclass(Tensor), index).as_subclass(Recorded)
            out.record = whole.record
            out.expert = int(index) if _is_scalar(index) else None
            return out
        if func in _APPLY and len(args) >= 2 and isinstance(args[1], Recorded):
            weight = args[1]
            if getattr(weight, "expert", None) is not None:
                weight.record(weight.expert, args[0])
        plain = [a.as_subclass(Tensor) if isinstance(a, Recorded) else a for a in args]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*plain, **kwargs)


def _is_scalar(index) -> bool:
    return isinstance(index, int) or (isinstance(index, Tensor) and index.numel() == 1)


def routed_rows(top_k_index: Tensor, expert: int) -> Tensor:
    """The tokens expert ``expert`` sees, in the eager loop's order: ``(rows,)`` token indices."""
    hit = (top_k_index == expert).T  # (top_k, tokens), as one_hot(...).permute(2, 1, 0)[expert]
    return torch.where(hit)[1]


@contextmanager
def recording(module: nn.Module, params: list[str], update: Callable[[str, int, Tensor], None]):
    """Run ``module`` eagerly with its fused weights ``params`` recording their inputs.

    ``update(param, expert, rows)`` receives each expert's input rows ``(n, d_in)`` in the eager
    loop's token order. transformers' experts modules dispatch on
    ``config._experts_implementation``; it is set to ``"eager"`` for the duration.
    """
    config = getattr(module, "config", None)
    before = getattr(config, "_experts_implementation", None)
    try:
        if before is not None:
            config._experts_implementation = "eager"
        for param in params:
            weight = getattr(module, param).detach().as_subclass(Recorded)
            weight.record = lambda e, x, p=param: update(p, e, x)
            weight.expert = None
            module.__dict__[param] = weight
        yield
    finally:
        for param in params:
            module.__dict__.pop(param, None)
        if before is not None:
            config._experts_implementation = before
