"""Steering-vector baselines: a constant vector added to one block's output (activation addition).

These are not adapters: a :class:`SteeringVector` is a plain forward hook that adds ``c · v`` to
every position of one transformer block's output hidden states. Used like an adapter
(``with vector(model, c=1.5): ...``), so the evaluation measures both with the same code.

* ``vector_<where>``: ``v`` is the mean difference of the block's output between the chosen and
  the rejected texts of the training pairs (mean-pooled over the attention mask for encoders,
  over the completion tokens for causal LMs; the same pairs the adapter trains on).
* ``random_<where>``: a random direction (seeded by the run's seed) with the same norm.

``where`` is ``out`` (the last block, i.e. the output embedding before pooling for encoders, the
residual stream before the final norm for causal LMs) or ``mid`` (block
``floor(eval.baselines.mid_block · n_blocks)``).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float
from loguru import logger
from torch import Tensor, nn

from .datasets import DataBundle
from .encoding import encoder_inputs
from .tokenization import pair_batches

KINDS = ("vector", "random")
PLACES = ("out", "mid")


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: the ``ModuleList`` of two or more same-class children with the
    most parameters (BERT's ``encoder.layer``, Llama's ``model.layers``, GPT-2's ``transformer.h``).
    """
    best, size = None, -1
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({type(m) for m in module}) != 1:
                continue
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = module, n
    if best is None:
        raise ValueError(f"{type(model).__name__}: no repeated block list found")
    return best


class SteeringVector:
    """``c · vector`` added to the output hidden states of ``block`` while in a ``with`` block.

    Args:
        block: the module whose output is shifted (its first output when it returns a tuple).
        vector: ``(d,)`` the shift at ``c = 1``.
        name, index: for reports: the method's name and the block's index.
    """

    def __init__(self, block: nn.Module, vector: Float[Tensor, " d"], name: str, index: int):
        self.block, self.vector, self.name, self.index = block, vector.detach().float(), name, index

    @contextmanager
    def __call__(self, model: nn.Module, c: float | Tensor = 1.0) -> Iterator["SteeringVector"]:
        if not any(m is self.block for m in model.modules()):
            raise ValueError(f"{self.name}: the block it was built on is not part of this model")
        c = torch.as_tensor(c, dtype=torch.float32)

        def hook(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output  # (batch, seq, d)
            scale = c.to(h.device).reshape(-1, 1, 1) if c.ndim else c.to(h.device)
            h = h + (scale * self.vector.to(h.device)).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = self.block.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    def describe(self) -> dict:
        return {"block": self.index, "norm": float(self.vector.norm())}


def _encoder_batches(tokenizer, texts: list[str], max_length: int, batch_size: int, device):
    for inputs in encoder_inputs(tokenizer, texts, max_length, batch_size, device):
        yield inputs, inputs["attention_mask"]


def _causal_batches(tokenizer, pairs, side: str, max_length: int, batch_size: int, device):
    for i in range(0, len(pairs), batch_size):
        cho, rej = pair_batches(tokenizer, pairs[i : i + batch_size], max_length)
        b = (cho if side == "chosen" else rej).to(device)
        yield {"input_ids": b.ids, "attention_mask": b.attention}, b.completion


@torch.no_grad()
def pooled_outputs(
    model: nn.Module, blocks: dict[int, nn.Module], batches
) -> dict[int, Float[Tensor, "n d"]]:
    """Each block's output hidden states, mean-pooled over each row's ``pool_mask`` (fp32, CPU).

    Args:
        blocks: ``{index: block}`` to capture in the same forwards.
        batches: ``(model kwargs, pool_mask (batch, seq))`` pairs.
    """
    seen: dict[int, Tensor] = {}
    out: dict[int, list[Tensor]] = {k: [] for k in blocks}

    def grab(index):
        def hook(module, inputs, output):
            seen[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [block.register_forward_hook(grab(k)) for k, block in blocks.items()]
    try:
        for kwargs, mask in batches:
            model(**kwargs)
            m = mask.unsqueeze(-1).float()  # (batch, seq, 1)
            for k in blocks:
                pooled = (seen[k].float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (batch, d)
                out[k].append(pooled.cpu())
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def baseline_blocks(model: nn.Module, mid_block: float) -> dict[str, int]:
    """``{"out": last block index, "mid": floor(mid_block · n_blocks)}``."""
    n = len(block_list(model))
    return {"out": n - 1, "mid": min(n - 1, int(mid_block * n))}


def build_baselines(
    model: nn.Module,
    tokenizer,
    data: DataBundle,
    model_kind: str,
    names: list[str],
    mid_block: float,
    seed: int,
    max_length: int,
    batch_size: int,
) -> dict[str, SteeringVector]:
    """The steering-vector baselines ``names`` (``vector_out``, ``random_mid``, ...), built from
    the training pairs on the base model (no adapter attached)."""
    if not names:
        return {}
    blocks = block_list(model)
    where = baseline_blocks(model, mid_block)
    if where["mid"] == where["out"]:
        logger.warning("baselines: the mid block is the last block; *_mid baselines are skipped")
        names = [n for n in names if not n.endswith("_mid")]
    wanted = {where[n.split("_")[1]] for n in names}
    capture = {k: blocks[k] for k in sorted(wanted)}
    device = next(model.parameters()).device
    if model_kind == "encoder":
        cho = [p.prompt + p.chosen for p in data.train]
        rej = [p.prompt + p.rejected for p in data.train]
        pos = pooled_outputs(
            model, capture, _encoder_batches(tokenizer, cho, max_length, batch_size, device)
        )
        neg = pooled_outputs(
            model, capture, _encoder_batches(tokenizer, rej, max_length, batch_size, device)
        )
    else:
        pairs = data.train
        pos = pooled_outputs(
            model,
            capture,
            _causal_batches(tokenizer, pairs, "chosen", max_length, batch_size, device),
        )
        neg = pooled_outputs(
            model,
            capture,
            _causal_batches(tokenizer, pairs, "rejected", max_length, batch_size, device),
        )
    out = {}
    for name in names:
        kind, place = name.split("_")
        k = where[place]
        mean_diff = pos[k].mean(0) - neg[k].mean(0)  # (d,)
        if kind == "random":
            generator = torch.Generator().manual_seed(seed * 1009 + k)  # per (seed, block)
            direction = torch.randn(mean_diff.shape, generator=generator)
            vector = direction / direction.norm() * mean_diff.norm()
        else:
            vector = mean_diff
        out[name] = SteeringVector(capture[k], vector, name, k)
    return out
