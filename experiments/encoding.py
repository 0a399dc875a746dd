"""Sentence embeddings of an encoder: normalised mean-pooled last hidden states (MiniLM's)."""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn


def mean_pool(
    hidden: Float[Tensor, "batch seq d"], mask: Int[Tensor, "batch seq"]
) -> Float[Tensor, "batch d"]:
    """Mean of the hidden states over the non-padding tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def encoder_inputs(
    tokenizer, texts: list[str], max_length: int, batch_size: int, device
) -> Iterator[dict[str, Tensor]]:
    """``{"input_ids", "attention_mask"}`` of ``texts``, ``batch_size`` at a time, padded per batch."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def embed(
    model: nn.Module, tokenizer, texts: list[str], max_length: int
) -> Float[Tensor, "batch d"]:
    """Normalised mean-pooled last hidden states (sentence-transformers' MiniLM embedding)."""
    device = next(model.parameters()).device
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    hidden = model(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
    ).last_hidden_state
    return F.normalize(mean_pool(hidden.float(), enc["attention_mask"]), dim=-1)


@torch.no_grad()
def embed_all(
    model: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 64
) -> Float[Tensor, "n d"]:
    """:func:`embed` in batches without gradients, on the CPU."""
    out = [
        embed(model, tokenizer, texts[i : i + batch_size], max_length).cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out)
