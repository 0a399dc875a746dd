"""Causal-LM rows: ``prompt + completion`` token ids, right-padded, with the completion marked."""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .datasets import Pair


@dataclass
class CausalBatch:
    """Right-padded ``prompt + completion`` ids and which positions are completion tokens.

    Attributes:
        ids: ``(batch, seq)`` token ids.
        attention: ``(batch, seq)`` 1 on real tokens.
        completion: ``(batch, seq)`` True on completion tokens (the ones whose NLL counts).
    """

    ids: Int[Tensor, "batch seq"]
    attention: Int[Tensor, "batch seq"]
    completion: Bool[Tensor, "batch seq"]

    def to(self, device) -> "CausalBatch":
        return CausalBatch(
            self.ids.to(device), self.attention.to(device), self.completion.to(device)
        )


def concat(*batches: CausalBatch) -> CausalBatch:
    """The rows of ``batches`` one after the other (all padded to the same length)."""
    return CausalBatch(
        torch.cat([b.ids for b in batches]),
        torch.cat([b.attention for b in batches]),
        torch.cat([b.completion for b in batches]),
    )


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _encode(
    tokenizer, prompts: list[str], completions: list[str], max_length: int
) -> list[tuple[list[int], int]]:
    """Each row's token ids and its prompt length; the prompt is cut from the left when the row
    is longer than ``max_length``, the completion always keeps at least one token."""
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        c = tokenizer.encode(completion, add_special_tokens=False)[: max_length - 1]
        p = p[max(0, len(p) + len(c) - max_length) :]
        rows.append((p + c, len(p)))
    return rows


def _pad(rows: list[tuple[list[int], int]], width: int, pad: int) -> CausalBatch:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    completion = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, n_prompt) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        completion[i, n_prompt : len(row)] = True
    return CausalBatch(ids, attention, completion)


def tokenize_completions(
    tokenizer, prompts: list[str], completions: list[str], max_length: int, seq: int | None = None
) -> CausalBatch:
    """Tokenise ``prompt + completion`` rows, right-padded to ``seq`` (or the longest row).

    The prompt is cut from the left when a row is longer than ``max_length``; the completion
    always keeps at least one token.
    """
    rows = _encode(tokenizer, prompts, completions, max_length)
    width = max(seq or 0, max(len(r) for r, _ in rows))
    return _pad(rows, width, _pad_id(tokenizer))


def pair_batches(tokenizer, pairs: list[Pair], max_length: int) -> tuple[CausalBatch, CausalBatch]:
    """Chosen and rejected rows of ``pairs``, each tokenised once, padded to one common length."""
    prompts = [p.prompt for p in pairs]
    cho = _encode(tokenizer, prompts, [p.chosen for p in pairs], max_length)
    rej = _encode(tokenizer, prompts, [p.rejected for p in pairs], max_length)
    width = max(len(r) for r, _ in cho + rej)
    pad = _pad_id(tokenizer)
    return _pad(cho, width, pad), _pad(rej, width, pad)
