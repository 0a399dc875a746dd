"""Do given factors fit a model? The one check every reader and builder of factors uses.

:func:`fit_problems` compares logical shapes with the model's linear layers; :func:`factor_problems`
adds the ranks and the meta device; :func:`layout_of` is the layout of exactly the named layers;
:func:`require_dense` refuses weights that are not in memory.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from .blocks import block_index, find_block_list
from .layout import TargetLayout, candidate_targets, resolve_targets, unwrap_model
from .ranks import infer_rank
from .sharding import is_dtensor


def require_dense(layout: TargetLayout, purpose: str) -> None:
    """Raise ``TypeError`` listing every target whose dense weight is not in memory.

    Quantized weights (bitsandbytes...), weights on the meta device (a meta model, or
    accelerate offloading) and FSDP2 shards cannot serve ``purpose`` (an SVD, a merge...).
    """
    quantized = [t.name for t in layout if t.quantized]
    absent = [t.name for t in layout if t.offloaded and not t.quantized]
    sharded = [t.name for t in layout if is_dtensor(t.weight)]
    problems = []
    for names, what, fix in (
        (quantized, "quantized", "load the base unquantized"),
        (absent, "on the meta device (a meta model, or offloaded)", "materialise the model"),
        (sharded, "sharded by FSDP2 (each rank holds a slice)", "build it before fully_shard"),
    ):
        if names:
            more = "..." if len(names) > 5 else ""
            problems.append(f"{what} target(s) {names[:5]}{more} — {fix}")
    if problems:
        raise TypeError(f"{purpose} needs each dense weight in memory: {'; '.join(problems)}")


def layout_of(model: nn.Module, names: Sequence[str]) -> TargetLayout:
    """The layout of exactly the weights ``names`` (model order), e.g. for factors from a file.

    Raises:
        ValueError: a name that is neither a linear layer nor a fused expert weight of ``model``.
    """
    model = unwrap_model(model)
    targets = resolve_targets(model, names)
    bad = [n for n, t in targets.items() if t is None]
    if bad:
        raise ValueError(f"{type(model).__name__} has no linear layer named {bad[:5]}")
    blocks = find_block_list(model)
    order = [n for n, _ in candidate_targets(model) if n in targets]
    return TargetLayout(
        targets={n: replace(targets[n], block=block_index(n, blocks)) for n in order},
        blocks=blocks,
        patterns=tuple(order),
        exclude=(),
        layer_range=None,
    )


def fit_problems(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str = "factors"
) -> tuple[list[str], list[str]]:
    """Why factors of logical shapes ``{target: (d_in, d_out[, experts])}`` do not fit ``model``.

    The one "these factors fit this model" check: every name must be a linear layer (or, with
    an expert count, a fused expert weight) of the model with exactly those widths. ``source``
    says where the shapes come from in messages.

    Returns:
        ``(absent, mismatched)``: names with no such weight, and ``"name: factors (...)
        vs model (...)"`` for width or expert-count mismatches. Both empty: the factors fit.
    """
    absent, mismatched = [], []
    resolved = resolve_targets(model, list(shapes))
    for name, shape in shapes.items():
        t = resolved[name]
        if t is None:
            absent.append(name)
            continue
        d_in, d_out, *rest = (int(n) for n in shape)
        experts = rest[0] if rest else None
        if (t.d_in, t.d_out, t.experts) != (d_in, d_out, experts):
            mine = f"d_in={d_in}, d_out={d_out}" + (f", experts={experts}" if experts else "")
            theirs = f"d_in={t.d_in}, d_out={t.d_out}" + (
                f", experts={t.experts}" if t.experts else ""
            )
            mismatched.append(f"{name}: {source} ({mine}) vs model ({theirs})")
    return absent, mismatched


def factor_shape(down: torch.Tensor, up: torch.Tensor) -> tuple[int, ...]:
    """``(d_in, d_out)`` of factors ``down (r, d_in)``, ``up (d_out, r)``; with experts
    ``(d_in, d_out, E)`` of ``(E, r, d_in)``, ``(E, d_out, r)``."""
    shape = (int(down.shape[-1]), int(up.shape[-2]))
    return shape + ((int(down.shape[0]),) if down.dim() == 3 else ())


def factor_problems(
    model: nn.Module,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    labels: tuple[str, str] = ("A", "B"),
) -> list[str]:
    """Why ``{target: (down ([E,] r, d_in), up ([E,] d_out, r))}`` cannot be a delta on ``model``.

    Ranks must agree between the two factors (:func:`~modlora.ranks.infer_rank`), the tensors
    must hold values (not ``meta``), and their widths must fit the weights (:func:`fit_problems`).
    """
    problems, shapes = [], {}
    for name, (down, up) in factors.items():
        try:
            infer_rank(name, down, up, down_label=labels[0], up_label=labels[1])
        except ValueError as err:
            problems.append(str(err))
            continue
        if down.device.type == "meta" or up.device.type == "meta":
            problems.append(f"{name}: factors are on the meta device (they hold no values)")
        shapes[name] = factor_shape(down, up)
    absent, mismatched = fit_problems(model, shapes)
    absent = [f"{name}: no such linear layer in {type(model).__name__}" for name in absent]
    return problems + absent + mismatched
