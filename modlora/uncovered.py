"""The weights ``all-linear`` cannot adapt, listed loudly instead of skipped in silence.

A weight matrix of the model that is neither a target (``nn.Linear``,
``Conv1D``, a fused expert weight whose layout is known) nor an embedding nor a MoE router is
something a user may expect ``all-linear`` to adapt — DBRX's experts stored as 2-D ``w1 / v1 /
w2``, a Mamba mixer's ``A_log`` and ``conv1d`` — so :func:`warn_uncovered` names them (a warning
at every selection with ``all-linear``).
"""

import re
from collections.abc import Sequence

from loguru import logger
from torch import nn

from .blocks import DEFAULT_EXCLUDE, matches_any

ROUTER_NAMES = ("gate", "router")
"""Last name components of MoE routers: left alone by design (README, "Mixture-of-experts")."""


def _is_router(name: str, module: nn.Module) -> bool:
    return name.rpartition(".")[2] in ROUTER_NAMES or "Router" in type(module).__name__


def uncovered_weights(
    modules: dict[str, nn.Module], covered: set[str], exclude: Sequence[str]
) -> list[str]:
    """Qualified names of the weight matrices (2-D or more; per-expert biases are not) that no
    adapter could take and ``exclude`` does not name; ``covered`` holds every candidate target
    (linear layers and fused expert parameters, selected or not by this ``layer_range``);
    ``modules`` is the model's ``dict(named_modules())``."""
    out = []
    for name, module in modules.items():
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


def warn_output_layer(
    model: nn.Module,
    modules: dict[str, nn.Module],
    found,
    regexes: Sequence[str],
    exclude: Sequence[str],
) -> None:
    """Warn when ``all-linear`` alone selected the model's output layer (``lm_head``). The default
    ``exclude`` skips it, but a given ``exclude`` replaces the default, and PEFT's ``all-linear``
    never takes it: likely not what was meant (one of the target ``regexes`` naming it says it
    was)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = next((n for n, m in modules.items() if m is head), None)
    if head is None or name not in found or any(re.search(p, name) for p in regexes):
        return
    logger.warning(
        "modlora: all-linear selected the output layer {!r} (exclude={} does not name it; the "
        "default exclude is {}): add {!r} to exclude unless you mean to adapt it",
        name,
        list(exclude),
        list(DEFAULT_EXCLUDE),
        name,
    )
