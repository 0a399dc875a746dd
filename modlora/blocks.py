"""A model's repeated block list, found by structure, and the depth band ``layer_range`` selects.

The block list is the ``nn.ModuleList`` of identical blocks with the most parameters outside the
excluded parts, so ``model.layers.N``, ``transformer.h.N``, ``encoder.layer.N``,
``gpt_neox.layers.N``, ``blocks.N`` and a multimodal model's text stack all work without a
hard-coded regex (a multimodal model's text stack outweighs its vision tower; a layer list
outweighs the expert list inside one layer).
"""

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

DEFAULT_EXCLUDE = ("lm_head", "vision_tower", "vision_model", "visual", "multi_modal_projector")

LayerRange = tuple[float, float] | tuple[int, int]


@dataclass(frozen=True)
class BlockList:
    """The model's repeated block list: ``prefix`` is its qualified name, ``size`` its length."""

    prefix: str
    size: int


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when any regex of ``patterns`` is found in ``name``."""
    return any(re.search(p, name) for p in patterns)


def find_block_list(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> BlockList | None:
    """Find the model's repeated block list by structure.

    Candidates are ``nn.ModuleList``s of two or more children of one class, none of whose names
    match ``exclude``. The candidate with the most parameters wins.
    """
    best: tuple[int, BlockList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if matches_any(name, exclude):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if best is None or n_params > best[0]:
            best = (n_params, BlockList(prefix=name, size=len(module)))
    return best[1] if best else None


def block_index(name: str, blocks: BlockList | None) -> int | None:
    """Index of the block ``name`` lives in, or ``None`` if it is outside the block list."""
    if blocks is None:
        return None
    prefix = blocks.prefix + "." if blocks.prefix else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def resolve_layer_range(layer_range: LayerRange, n_blocks: int) -> range:
    """Turn ``layer_range`` into block indices.

    Two ints are absolute indices ``[lo, hi)``; floats are fractions of the depth, block ``i``
    kept when ``round(lo * n) <= i < round(hi * n)``. ``(0.2, 0.8)`` on 6 blocks keeps 1..4.
    """
    if len(layer_range) != 2:
        raise ValueError(f"layer_range must be (lo, hi), got {layer_range!r}")
    lo, hi = layer_range
    if isinstance(lo, bool) or isinstance(hi, bool):
        raise TypeError(f"layer_range must hold numbers, got {layer_range!r}")
    if isinstance(lo, int) and isinstance(hi, int):
        start, stop = lo, hi
    else:
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            raise ValueError(f"fractional layer_range must lie in [0, 1], got {layer_range!r}")
        start, stop = round(lo * n_blocks), round(hi * n_blocks)
    if not 0 <= start < stop <= n_blocks:
        raise ValueError(
            f"layer_range={layer_range!r} selects blocks [{start}, {stop}) of a model with "
            f"{n_blocks} blocks: the band is empty or out of range"
        )
    return range(start, stop)
