"""Which sample each input row of a layer belongs to, for a per-sample coefficient ``c``.

A per-sample ``c`` has one value per sample of the model's batch. A layer sees its input as
``(batch, …, d_in)`` (most layers: batch on the first axis), as ``(batch · seq, d_in)`` (OPT's MLP,
a MoE block's shared expert and fused experts flatten the tokens), or as the subset of tokens a
router sent to one expert (``experts.3.w1``). The model's own input shape ``(batch, seq)`` is
recorded when the model is called (:class:`BatchShape`), so the flattened layout is provable:
row ``i`` is sample ``i // seq``. Routed inputs cannot be mapped back to samples from the layer:
they raise, as does any layout that matches none of these.
"""

import torch
from torch import Tensor, nn

_INPUT_NAMES = ("input_ids", "inputs_embeds", "hidden_states", "pixel_values", "x")


class BatchShape:
    """A forward pre-hook on the model that records ``(batch, seq)`` of each call's input."""

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None:
            first = next(
                (kwargs[k] for k in _INPUT_NAMES if isinstance(kwargs.get(k), Tensor)), None
            )
        self.shape = tuple(first.shape[:2]) if first is not None and first.dim() >= 2 else None


def per_row(name: str, x: Tensor, c: Tensor, batch: tuple[int, int] | None, routed: bool) -> Tensor:
    """``c`` for every row of ``x`` along its first axis: ``(x.shape[0],)``.

    Args:
        name: the target (for messages).
        x: the layer's input, ``(batch, …, d_in)`` or ``(rows, d_in)``.
        c: one value per sample, ``(batch,)``.
        batch: the model input's ``(batch, seq)`` recorded for this call (``None``: unknown).
        routed: the layer sees only the tokens routed to its expert.

    Raises:
        ValueError: the rows cannot be mapped to samples; the message names the layer and shapes.
    """
    n, b = x.shape[0], c.shape[0]
    where = f"per-sample coefficient has {b} values but the input of {name!r} has shape {tuple(x.shape)}"
    if routed:
        raise ValueError(
            f"{where}: {name!r} is an expert inside an expert list, and its input rows are the "
            "tokens its router picked, which cannot be mapped back to samples from the layer; "
            "use a scalar c (or exclude the experts)"
        )
    if x.dim() >= 3:
        if n != b:
            raise ValueError(f"{where} (batch must be the first axis)")
        return c
    if x.dim() == 2 and batch is not None and batch[0] == b and n == b * batch[1]:
        return c.repeat_interleave(
            batch[1]
        )  # flattened (batch · seq, d_in): row i is sample i // seq
    if x.dim() == 2 and n == b:
        return c  # one row per sample (a pooler's input)
    raise ValueError(
        f"{where} (the model's input was {batch}): its rows are neither the batch, nor the "
        "batch's tokens flattened (batch · seq)"
    )


def row_scale(s: Tensor, like: Tensor) -> Tensor:
    """``s (rows,)`` viewed to broadcast over ``like (rows, …)``."""
    return s.view(-1, *([1] * (like.dim() - 1)))


def rows_by_value(c_rows: Tensor) -> list[tuple[float, Tensor]]:
    """``[(value, row mask)]`` for every distinct value of ``c_rows``."""
    return [(float(v), c_rows == v) for v in torch.unique(c_rows)]
