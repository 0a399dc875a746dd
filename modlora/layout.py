"""Which weights an adapter touches: :func:`find_targets` and :class:`TargetLayout`.

Targets are ``nn.Linear`` layers and transformers' ``Conv1D`` (GPT-2, weight stored
``(d_in, d_out)``). The block index of a target comes from the model's block list
(:mod:`modlora.blocks`). Whether given factors fit a model is :mod:`modlora.fit`'s question.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

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
from .experts import fused_expert_params, hidden_size
from .target import (
    Target,
    expert_target,
    is_routed,
    is_target_type,
    make_target,
    returns_tuple,
)
from .uncovered import uncovered_weights, warn_output_layer, warn_uncovered

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


def selected(model: nn.Module, targets, exclude, layer_range) -> TargetLayout:
    """``targets`` itself when it is a :class:`TargetLayout` already made for ``model`` (e.g. a
    checkpoint's, validated), else :func:`find_targets` of the selection."""
    if isinstance(targets, TargetLayout):
        modules = dict(unwrap_model(model).named_modules())
        foreign = [
            t.name
            for t in targets
            if modules.get(t.name if t.param is None else t.name.rpartition(".")[0]) is not t.module
        ]
        if foreign:
            raise ValueError(
                f"targets is a TargetLayout made on another model than this "
                f"{type(unwrap_model(model)).__name__}: its layers {foreign[:3]}"
                f"{'...' if len(foreign) > 3 else ''} are not this model's (find_targets(model))"
            )
        return targets
    return find_targets(model, targets, exclude, layer_range)


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

    modules = dict(model.named_modules())  # one walk of the module tree, shared below
    candidates = candidate_targets(model, modules)
    hits: dict[str, int] = {p: 0 for p in patterns}
    found: dict[str, Target] = {}
    for name, build in candidates:
        matched = [p for p in patterns if p == ALL_LINEAR or re.search(p, name)]
        router = name in modules and returns_tuple(modules[name])
        if router:  # a router (PhiMoE's): all-linear leaves it alone, a pattern naming it raises
            matched = [p for p in matched if p != ALL_LINEAR]
        for p in matched:
            hits[p] += 1
        if not matched or matches_any(name, exclude):
            continue
        if router:
            raise ValueError(
                f"target {name!r} ({type(modules[name]).__name__}) is an nn.Linear whose forward "
                f"returns a tuple (a MoE router), not x Wᵀ: no delta can be added to its output; "
                f"exclude it (pattern(s) {matched} select it)"
            )
        index = block_index(name, blocks)
        if band is not None and in_band(name, blocks, layer_range) is False:
            continue
        found[name] = build(index)

    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        raise ValueError(
            f"target pattern(s) {missing} matched no linear layer or fused expert weight of "
            f"{type(model).__name__} ({len(candidates)} searched, e.g. "
            f"{[n for n, _ in candidates[:3]]})"
        )
    if not found:
        raise ValueError(
            f"no target left for {type(model).__name__}: targets={patterns}, exclude={exclude}, "
            f"layer_range={layer_range} (block list {blocks})"
        )
    if ALL_LINEAR in patterns:
        warn_uncovered(model, uncovered_weights(modules, {n for n, _ in candidates}, exclude))
        regexes = [p for p in patterns if p != ALL_LINEAR]
        warn_output_layer(model, modules, found, regexes, exclude)
    return TargetLayout(
        targets=found,
        blocks=blocks,
        patterns=patterns,
        exclude=exclude,
        layer_range=tuple(layer_range) if layer_range is not None else None,
    )


def candidate_targets(
    model: nn.Module, modules: dict[str, nn.Module] | None = None
) -> list[tuple[str, Callable[[int | None], Target]]]:
    """Every weight an adapter can attach to, in model order, as ``(name, build)`` pairs;
    ``build(block)`` makes the :class:`Target` (a fused expert weight's orientation is
    established only then, so a weight nobody selects never raises). ``modules``: the model's
    ``dict(named_modules())`` when the caller has it already."""
    hidden = hidden_size(model)
    modules = dict(model.named_modules()) if modules is None else modules
    out = []
    for name, module in modules.items():
        if name and is_target_type(module):
            routed = is_routed(name, modules)
            out.append((name, partial(make_target, name, module, routed=routed)))
            continue
        for param in fused_expert_params(module):
            full = f"{name}.{param}" if name else param
            out.append((full, partial(expert_target, full, module, param, hidden=hidden)))
    return out


def resolve_targets(model: nn.Module, names) -> dict[str, Target | None]:
    """``{name: Target}`` for each of ``names`` in ``model`` (a linear layer or a fused expert
    weight; ``None`` when the model has no such weight). The module tree is walked once."""
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    hidden = hidden_size(model)
    out: dict[str, Target | None] = {}
    for name in names:
        module = modules.get(name)
        if module is not None and is_target_type(module):
            out[name] = make_target(name, module, None, routed=is_routed(name, modules))
            continue
        owner, _, param = name.rpartition(".")
        module = modules.get(owner)
        fused = module is not None and param in fused_expert_params(module)
        out[name] = expert_target(name, module, param, None, hidden=hidden) if fused else None
    return out


def resolve_target(model: nn.Module, name: str) -> Target | None:
    """:func:`resolve_targets` for one name."""
    return resolve_targets(model, [name])[name]
