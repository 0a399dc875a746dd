"""Do given factors fit a model? The one check every reader and builder of factors uses.

:func:`fit_problems` compares logical shapes with the model's linear layers; :func:`factor_problems`
adds the ranks and the meta device; :func:`layout_of` is the layout of exactly the named layers;
:func:`require_dense` refuses weights that are not in memory.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .blocks import block_index, find_block_list
from .layout import TargetLayout, is_target_type, make_target, unwrap_model
from .ranks import infer_rank
from .sharding import is_dtensor


def require_dense(layout: TargetLayout, purpose: str) -> None:
    """Raise ``TypeError`` listing every target whose dense weight is not in memory.

    Quantized weights (bitsandbytes...), weights on the meta device (a meta model, or
    accelerate offloading) and FSDP2 shards cannot serve ``purpose`` (an SVD, a merge...).
    """
    quantized = [t.name for t in layout if t.quantized]
    absent = [t.name for t in layout if t.offloaded and not t.quantized]
    sharded = [t.name for t in layout if is_dtensor(t.module.weight)]
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
    """The layout of exactly the layers ``names`` (model order), e.g. for factors from a file.

    Raises:
        ValueError: a name that is not a linear layer of ``model``.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    bad = [n for n in names if n not in modules or not is_target_type(modules[n])]
    if bad:
        raise ValueError(f"{type(model).__name__} has no linear layer named {bad[:5]}")
    blocks = find_block_list(model)
    wanted = set(names)
    order = [n for n in modules if n in wanted]
    return TargetLayout(
        targets={n: make_target(n, modules[n], block_index(n, blocks)) for n in order},
        blocks=blocks,
        patterns=tuple(order),
        exclude=(),
        layer_range=None,
    )


def fit_problems(
    model: nn.Module, shapes: Mapping[str, tuple[int, int]], source: str = "factors"
) -> tuple[list[str], list[str]]:
    """Why factors of logical shapes ``{target: (d_in, d_out)}`` do not fit ``model``.

    The one "these factors fit this model" check: every name must be a linear layer of the
    model with exactly those widths. ``source`` says where the shapes come from in messages.

    Returns:
        ``(absent, mismatched)``: names with no such linear layer, and ``"name: factors (...)
        vs layer (...)"`` for width mismatches. Both empty: the factors fit.
    """
    modules = dict(unwrap_model(model).named_modules())
    absent, mismatched = [], []
    for name, (d_in, d_out) in shapes.items():
        module = modules.get(name)
        if module is None or not is_target_type(module):
            absent.append(name)
            continue
        t = make_target(name, module, None)
        if (t.d_in, t.d_out) != (int(d_in), int(d_out)):
            mismatched.append(
                f"{name}: {source} (d_in={d_in}, d_out={d_out}) vs model "
                f"(d_in={t.d_in}, d_out={t.d_out})"
            )
    return absent, mismatched


def factor_problems(
    model: nn.Module,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    labels: tuple[str, str] = ("A", "B"),
) -> list[str]:
    """Why ``{target: (down (r, d_in), up (d_out, r))}`` cannot be a delta on ``model``.

    Ranks must agree between the two factors (:func:`~modlora.ranks.infer_rank`), the tensors
    must hold values (not ``meta``), and their widths must fit the layers (:func:`fit_problems`).
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
        shapes[name] = (down.shape[-1], up.shape[-2])
    absent, mismatched = fit_problems(model, shapes)
    absent = [f"{name}: no such linear layer in {type(model).__name__}" for name in absent]
    return problems + absent + mismatched
