"""The weights ``all-linear`` cannot adapt, listed loudly instead of skipped in silence.

A weight matrix of the model that is neither a target (``nn.Linear``,
``Conv1D``, a fused expert weight whose layout is known) nor an embedding nor a MoE router is
something a user may expect ``all-linear`` to adapt — DBRX's experts stored as 2-D ``w1 / v1 /
w2``, a Mamba mixer's ``A_log`` and ``conv1d`` — so :func:`warn_uncovered` names them (a warning
at every selection with ``all-linear``).
"""

from collections.abc import Sequence

from loguru import logger
from torch import nn

from .blocks import matches_any

ROUTER_NAMES = ("gate", "router")
"""Last name components of MoE routers: left alone by design (README, "Mixture-of-experts")."""


def _is_router(name: str, module: nn.Module) -> bool:
    return name.rpartition(".")[2] in ROUTER_NAMES or "Router" in type(module).__name__


def uncovered_weights(model: nn.Module, covered: set[str], exclude: Sequence[str]) -> list[str]:
    """Qualified names of the weight matrices (2-D or more; per-expert biases are not) that no
    target covers and ``exclude`` does not name; ``covered`` holds the target names (modules and
    fused expert parameters)."""
    out = []
    for name, module in model.named_modules():
        if name in covered or matches_any(name, exclude):
            continue
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) or _is_router(name, module):
            continue
        for param, tensor in module.named_parameters(recurse=False):
            full = f"{name}.{param}"
            if tensor.dim() >= 2 and not param.endswith("bias") and full not in covered:
                out.append(full)
    return out


def warn_uncovered(model: nn.Module, names: list[str]) -> None:
    if names:
        logger.warning(
            "modlora: all-linear leaves {} weight(s) of {} unadapted (neither linear layers nor "
            "fused experts of a known layout): {}",
            len(names),
            type(model).__name__,
            names[:5],
        )
