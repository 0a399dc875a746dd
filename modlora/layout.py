"""Which layers an adapter touches: :func:`find_targets` and :class:`TargetLayout`.

Targets are ``nn.Linear`` layers and transformers' ``Conv1D`` (GPT-2, weight stored
``(d_in, d_out)``). The block index of a target comes from the model's block list
(:mod:`modlora.blocks`). Whether given factors fit a model is :mod:`modlora.fit`'s question.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import (
    DEFAULT_EXCLUDE,
    BlockList,
    LayerRange,
    block_index,
    find_block_list,
    in_band,
    matches_any,
    resolve_layer_range,
)

ALL_LINEAR = "all-linear"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s ``OptimizedModule`` and ``(Distributed)DataParallel``.

    Adapters are built on, and attach to, the plain model, so target names never carry the
    wrappers' ``_orig_mod.`` / ``module.`` prefixes.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
        if isinstance(model, parallel):
            model = model.module
            continue
        return model


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with weight ``(d_in, d_out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_target_type(module: nn.Module) -> bool:
    """True for the layer types an adapter can attach to."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_quantized(module: nn.Module) -> bool:
    """True when the layer's weight is not a dense float tensor (bitsandbytes 4/8-bit, ...)."""
    weight = module.weight
    return (
        type(weight).__name__ in ("Params4bit", "Int8Params") or not weight.dtype.is_floating_point
    )


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its weight's device, or accelerate's execution device when
    the weight is offloaded (kept on ``meta`` between forwards)."""
    device = module.weight.device
    if device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        target = getattr(hook, "execution_device", None)
        if target is not None:
            return torch.device(target)
    return device


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
        """The device the layer computes on (see :func:`execution_device`)."""
        return execution_device(self.module)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def offloaded(self) -> bool:
        """The weight is not in memory (``meta``): a meta model, or accelerate offloading."""
        return self.module.weight.device.type == "meta"

    def dense_weight(self) -> torch.Tensor:
        """The weight as a ``(d_out, d_in)`` view (no copy); refuses quantized or meta layers."""
        if self.quantized:
            raise TypeError(
                f"target {self.name!r} is quantized ({type(self.module.weight).__name__}); "
                "this operation needs the dense weight — load the base model unquantized"
            )
        if self.offloaded:
            raise TypeError(
                f"target {self.name!r} has its weight on the meta device (a meta model, or "
                "offloaded by accelerate); this operation needs the weight in memory"
            )
        weight = self.module.weight
        return weight.T if self.transposed else weight


@dataclass(frozen=True)
class TargetLayout:
    """The layers an adapter attaches to, and the selection that produced them.

    Attributes:
        targets: ``{name: Target}`` in model order.
        blocks: the block list used for ``layer_range`` (``None`` if the model has none).
        patterns: the ``targets`` patterns as given.
        exclude: the ``exclude`` patterns as given.
        layer_range: the depth band as given.
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


def _normalise_patterns(patterns, what: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    if patterns is None or not isinstance(patterns, Sequence):
        raise TypeError(f"{what} must be a string or a sequence of strings, got {patterns!r}")
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
        model: any ``nn.Module`` (``torch.compile`` / DDP wrappers are looked through).
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
    model = unwrap_model(model)
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
        if not matched or matches_any(name, exclude):
            continue
        index = block_index(name, blocks)
        if band is not None and in_band(name, blocks, layer_range) is False:
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
    )
