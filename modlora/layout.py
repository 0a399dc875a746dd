"""Which layers an adapter touches: :func:`find_targets` and :class:`TargetLayout`.

Targets are ``nn.Linear`` layers and transformers' ``Conv1D`` (GPT-2, weight stored
``(d_in, d_out)``). The block index of a target comes from the model's repeated block list,
found by structure (the largest ``nn.ModuleList`` of identical blocks outside the excluded
parts), so ``model.layers.N``, ``transformer.h.N``, ``encoder.layer.N``, ``gpt_neox.layers.N``,
``blocks.N`` and a multimodal model's text stack all work without a hard-coded regex.
"""

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

ALL_LINEAR = "all-linear"
DEFAULT_EXCLUDE = ("lm_head", "vision_tower", "vision_model", "visual", "multi_modal_projector")

LayerRange = tuple[float, float] | tuple[int, int]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with weight ``(d_in, d_out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_target_type(module: nn.Module) -> bool:
    """True for the layer types an adapter can attach to."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def is_quantized(module: nn.Module) -> bool:
    """True when the layer's weight is not a dense float tensor (bitsandbytes 4/8-bit, ...)."""
    weight = module.weight
    return (
        type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point
    )


@dataclass(frozen=True)
class Target:
    """One adapted layer.

    Attributes:
        name: the module's qualified name in the model (``model.layers.3.self_attn.q_proj``).
        module: the layer itself.
        d_in: input width.
        d_out: output width.
        block: index in the model's block list, or ``None`` outside it.
        transposed: weight stored ``(d_in, d_out)`` (GPT-2 ``Conv1D``).
        quantized: weight is not a dense float tensor.
    """

    name: str
    module: nn.Module = field(compare=False, repr=False)
    d_in: int
    d_out: int
    block: int | None
    transposed: bool = False
    quantized: bool = False

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    def dense_weight(self) -> torch.Tensor:
        """The weight as a ``(d_out, d_in)`` view (no copy); refuses quantized layers."""
        if self.quantized:
            raise TypeError(
                f"target {self.name!r} is quantized ({type(self.module.weight).__name__}); "
                "this operation needs the dense weight — load the base model unquantized"
            )
        weight = self.module.weight
        return weight.T if self.transposed else weight


@dataclass(frozen=True)
class BlockList:
    """The model's repeated block list: ``prefix`` is its qualified name, ``size`` its length."""

    prefix: str
    size: int


@dataclass(frozen=True)
class TargetLayout:
    """The layers an adapter attaches to, and the selection that produced them.

    Attributes:
        targets: ``{name: Target}`` in model order.
        blocks: the block list used for ``layer_range`` (``None`` if the model has none).
        spec: ``targets`` patterns, ``exclude`` patterns and ``layer_range`` as given.
    """

    targets: dict[str, Target]
    blocks: BlockList | None
    patterns: tuple[str, ...]
    exclude: tuple[str, ...]
    layer_range: LayerRange | None

    def __iter__(self):
        return iter(self.targets.values())

    def __len__(self) -> int:
        return len(self.targets)

    def __contains__(self, name: str) -> bool:
        return name in self.targets

    def __getitem__(self, name: str) -> Target:
        return self.targets[name]

    @property
    def names(self) -> list[str]:
        return list(self.targets)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (d_in, d_out)}`` for every target."""
        return {t.name: (t.d_in, t.d_out) for t in self}


def find_block_list(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> BlockList | None:
    """Find the model's repeated block list by structure.

    Candidates are ``nn.ModuleList``s of two or more children of one class, none of whose names
    match ``exclude``. The candidate with the most parameters wins (a multimodal model's text
    stack outweighs its vision tower; a layer list outweighs the expert list inside one layer).
    """
    best: tuple[int, BlockList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if _matches_any(name, exclude):
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


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _normalise_patterns(patterns, what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} must be strings (regexes or 'all-linear'), got {p!r}")
        if p != ALL_LINEAR:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"{what} pattern {p!r} is not a valid regex: {err}") from err
    return patterns


def find_targets(
    model: nn.Module,
    targets: Sequence[str] | str = (ALL_LINEAR,),
    exclude: Sequence[str] | str = DEFAULT_EXCLUDE,
    layer_range: LayerRange | None = None,
) -> TargetLayout:
    """Select the layers an adapter attaches to.

    Args:
        model: any ``nn.Module``.
        targets: ``"all-linear"`` and/or regexes searched in each layer's qualified name.
            Every pattern must match at least one layer.
        exclude: regexes; a layer whose name matches any of them is skipped. The default skips
            ``lm_head`` (often tied to the embedding) and vision towers.
        layer_range: depth band over the block list, ``(0.2, 0.8)`` as fractions or ``(2, 5)``
            as indices ``[lo, hi)``. Layers outside the block list are kept if not excluded.

    Returns:
        The :class:`TargetLayout`.

    Raises:
        ValueError: a pattern matches nothing, the band is empty, or nothing is left.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_targets needs an nn.Module, got {type(model).__name__}")
    patterns = _normalise_patterns(targets, "targets")
    exclude = _normalise_patterns(exclude, "exclude")
    if not patterns:
        raise ValueError("targets is empty: give 'all-linear' or at least one regex")
    blocks = find_block_list(model, exclude)
    band = None
    if layer_range is not None:
        if blocks is None:
            raise ValueError(
                f"layer_range={layer_range!r} given but {type(model).__name__} has no repeated "
                "block list (no nn.ModuleList of identical blocks)"
            )
        band = resolve_layer_range(tuple(layer_range), blocks.size)

    candidates = [(name, m) for name, m in model.named_modules() if name and is_target_type(m)]
    hits: dict[str, int] = {p: 0 for p in patterns}
    found: dict[str, Target] = {}
    for name, module in candidates:
        matched = [p for p in patterns if p == ALL_LINEAR or re.search(p, name)]
        for p in matched:
            hits[p] += 1
        if not matched or _matches_any(name, exclude):
            continue
        index = block_index(name, blocks)
        if band is not None and index is not None and index not in band:
            continue
        found[name] = make_target(name, module, index)

    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        raise ValueError(
            f"target pattern(s) {missing} matched no linear layer of {type(model).__name__} "
            f"({len(candidates)} linear layers searched, e.g. {[n for n, _ in candidates[:3]]})"
        )
    if not found:
        raise ValueError(
            f"no target left for {type(model).__name__}: targets={patterns}, exclude={exclude}, "
            f"layer_range={layer_range} (block list {blocks})"
        )
    return TargetLayout(
        targets=found,
        blocks=blocks,
        patterns=patterns,
        exclude=exclude,
        layer_range=tuple(layer_range) if layer_range is not None else None,
    )


def make_target(name: str, module: nn.Module, block: int | None) -> Target:
    transposed = _is_conv1d(module)
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
    )
