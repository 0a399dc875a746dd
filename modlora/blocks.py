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
from numbers import Integral, Real

from torch import nn

from .checks import scalar

DEFAULT_EXCLUDE = ("lm_head", "vision_tower", "vision_model", "visual", "multi_modal_projector")

LayerRange = tuple[Real, Real]
"""``(lo, hi)``: two fractions of the depth, or two block indices (``int`` or NumPy scalars)."""


STACK_SHARE = 0.25
"""A second block list counts as a stack of its own (an encoder-decoder's other half) when it
holds at least this share of the largest one's parameters and is not nested in it."""


@dataclass(frozen=True)
class BlockList:
    """The model's repeated block list: ``prefix`` is its qualified name, ``size`` its length.

    ``stacks`` lists every stack ``(prefix, size)``, this one first: an encoder-decoder (T5,
    BART, Whisper) has two, and ``layer_range`` selects the same depth band in each.
    """

    prefix: str
    size: int
    stacks: tuple[tuple[str, int], ...] = ()

    def all_stacks(self) -> tuple[tuple[str, int], ...]:
        return self.stacks or ((self.prefix, self.size),)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when any regex of ``patterns`` is found in ``name``."""
    return any(re.search(p, name) for p in patterns)


def find_block_list(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> BlockList | None:
    """Find the model's repeated block list by structure.

    Candidates are ``nn.ModuleList``s of two or more children of one class, none of whose names
    match ``exclude``. The candidate with the most parameters wins; other candidates with at
    least ``STACK_SHARE`` of its parameters that neither contain nor lie inside a chosen one are
    further stacks (an encoder-decoder's encoder and decoder).
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if matches_any(name, exclude):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        candidates.append((sum(p.numel() for p in module.parameters()), name, len(module)))
    if not candidates:
        return None
    candidates.sort(key=lambda c: -c[0])  # stable: model order among equals
    chosen = [candidates[0]]
    for cand in candidates[1:]:
        nested = any(_inside(cand[1], c[1]) or _inside(c[1], cand[1]) for c in chosen)
        if cand[0] >= STACK_SHARE * candidates[0][0] and not nested:
            chosen.append(cand)
    stacks = tuple((name, size) for _, name, size in chosen)
    return BlockList(
        prefix=stacks[0][0], size=stacks[0][1], stacks=stacks if len(stacks) > 1 else ()
    )


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _locate(name: str, blocks: BlockList | None) -> tuple[int, int] | None:
    """``(index in its stack, that stack's size)`` of the block ``name`` lives in, or ``None``."""
    for stack, size in blocks.all_stacks() if blocks is not None else ():
        prefix = stack + "." if stack else ""
        if name.startswith(prefix):
            head = name[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                return int(head), size
    return None


def block_index(name: str, blocks: BlockList | None) -> int | None:
    """Index of the block ``name`` lives in (within its own stack), or ``None`` outside them."""
    found = _locate(name, blocks)
    return found[0] if found is not None else None


def in_band(name: str, blocks: BlockList | None, layer_range: LayerRange) -> bool | None:
    """Whether ``name`` lies in the band ``layer_range`` of its own stack (``None`` outside
    every stack: such layers are kept if not excluded)."""
    found = _locate(name, blocks)
    if found is None:
        return None
    index, size = found
    return index in resolve_layer_range(layer_range, size)


def _bounds(layer_range: LayerRange) -> tuple[Real, Real]:
    """``(lo, hi)`` as two ints (block indices) or two floats (fractions within [0, 1])."""
    if len(layer_range) != 2:
        raise ValueError(f"layer_range must be (lo, hi), got {layer_range!r}")
    lo, hi = (scalar(v) for v in layer_range)  # NumPy scalars, 0-d tensors: their numbers
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in (lo, hi)):
        raise TypeError(f"layer_range must hold numbers, got {layer_range!r}")
    if isinstance(lo, Integral) and isinstance(hi, Integral):
        return lo, hi
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
        raise ValueError(f"fractional layer_range must lie in [0, 1], got {layer_range!r}")
    return lo, hi


def check_layer_range(layer_range: Sequence) -> None:
    """Check ``layer_range`` as far as that is possible without a model: two numbers, fractions
    within [0, 1], and ``0 <= lo < hi`` (otherwise the band is empty at every depth)."""
    lo, hi = _bounds(layer_range)
    if not 0 <= lo < hi:
        raise ValueError(
            f"layer_range={layer_range!r} selects no block at any depth: it needs 0 <= lo < hi"
        )


def resolve_layer_range(layer_range: LayerRange, n_blocks: int) -> range:
    """Turn ``layer_range`` into block indices.

    Two ints are absolute indices ``[lo, hi)``; floats are fractions of the depth, block ``i``
    kept when ``round(lo * n) <= i < round(hi * n)``. ``(0.2, 0.8)`` on 6 blocks keeps 1..4.
    """
    lo, hi = _bounds(layer_range)
    if isinstance(lo, Integral):
        start, stop = lo, hi
    else:
        start, stop = round(lo * n_blocks), round(hi * n_blocks)
    if not 0 <= start < stop <= n_blocks:
        raise ValueError(
            f"layer_range={layer_range!r} selects blocks [{start}, {stop}) of a model with "
            f"{n_blocks} blocks: the band is empty or out of range"
        )
    return range(start, stop)
