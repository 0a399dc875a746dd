"""Loss primitives of the causal objectives: next-token logits, completion NLL, per-position KL."""

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from .tokenization import CausalBatch

AGGREGATES = ("mean", "rmse", "p95", "max")


def next_token_logits(model: nn.Module, batch: CausalBatch) -> Float[Tensor, "batch seq_1 vocab"]:
    """Logits predicting tokens ``1..seq-1`` (fp32)."""
    out = model(input_ids=batch.ids, attention_mask=batch.attention)
    return out.logits[:, :-1].float()


def token_nll(
    logits: Float[Tensor, "batch seq_1 vocab"], batch: CausalBatch
) -> Float[Tensor, " batch"]:
    """Mean NLL per row over its completion tokens."""
    target = batch.ids[:, 1:]
    mask = batch.completion[:, 1:].float()  # (batch, seq-1)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (batch, seq-1)
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def position_kl(
    logits_c: Float[Tensor, "batch seq_1 vocab"],
    logits_ref: Float[Tensor, "batch seq_1 vocab"],
    top_k: int | None,
) -> Float[Tensor, "batch seq_1"]:
    """``KL(p_c ‖ p_ref)`` per position in fp32; with ``top_k``, over the reference's top-K tokens
    only, both distributions renormalised over those K."""
    logits_c, logits_ref = logits_c.float(), logits_ref.float()
    if top_k is not None and top_k < logits_ref.shape[-1]:
        idx = logits_ref.topk(top_k, dim=-1).indices  # (batch, seq-1, k)
        logits_c = logits_c.gather(-1, idx)
        logits_ref = logits_ref.gather(-1, idx)
    logp_c = F.log_softmax(logits_c, dim=-1)
    logp_ref = F.log_softmax(logits_ref, dim=-1)
    return (logp_c.exp() * (logp_c - logp_ref)).sum(-1)


def masked_mean(values: Float[Tensor, "batch seq_1"], mask: Bool[Tensor, "batch seq_1"]) -> Tensor:
    """Mean of ``values`` over the True entries of ``mask``."""
    m = mask.float()
    return (values * m).sum() / m.sum().clamp_min(1.0)


def aggregate_positions(
    values: Float[Tensor, "batch seq_1"], mask: Bool[Tensor, "batch seq_1"], how: str
) -> Float[Tensor, " batch"]:
    """Per-row ``mean`` | ``rmse`` | ``p95`` | ``max`` of ``values`` over the masked positions."""
    if how not in AGGREGATES:
        raise ValueError(f"objective.aggregate must be one of {AGGREGATES}, got {how!r}")
    out = []
    for row, m in zip(values, mask, strict=True):
        v = row[m]
        if v.numel() == 0:
            out.append(row.new_zeros(()))
        elif how == "mean":
            out.append(v.mean())
        elif how == "rmse":
            out.append(v.pow(2).mean().clamp_min(1e-12).sqrt())  # finite gradient at D = 0
        elif how == "p95":
            out.append(torch.quantile(v, 0.95))
        else:
            out.append(v.max())
    return torch.stack(out)


def soft_nll(nll: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """``ñll = nll / max(detach(nll), 1)``: the push term's gradient is bounded as nll grows."""
    return nll / nll.detach().clamp_min(1.0)
