"""Measurements at one coefficient: the encoder probe / cosine / retrieval and the causal margin / NLL / KL.

A ``*Meter`` precomputes everything at ``c = 0`` once (base embeddings, the probe, base logits),
then ``meter(adapter, c)`` returns one row of metrics for that coefficient. The evaluation sweep
and the ``c_scan`` calibration share the meters.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .datasets import DataBundle
from .objectives import (
    embed_all,
    masked_mean,
    next_token_logits,
    pair_batches,
    position_kl,
    token_nll,
)


@dataclass
class Probe:
    """Logistic regression on standardised embeddings: ``P(positive) = σ(((x − μ)/σ)·w + b)``."""

    mean: Float[Tensor, " d"]
    std: Float[Tensor, " d"]
    weight: Float[Tensor, " d"]
    bias: Float[Tensor, ""]

    def logits(self, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def prob(self, x: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        return torch.sigmoid(self.logits(x))


def fit_probe(x: Float[Tensor, "n d"], y: Int[Tensor, " n"], l2: float, steps: int) -> Probe:
    """Fit a :class:`Probe` by L-BFGS on the mean log-loss plus ``l2 · |w|²`` (deterministic)."""
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # (n, d)
    target = y.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, target) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(mean, std, w.detach(), b.detach())


def spearman(x: list[float | int], y: list[float | int]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when one side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def _ranks(values: list[float | int]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


class EncoderMeter:
    """Trait score (probe P(positive)), cosine to ``c = 0`` and paraphrase retrieval at any ``c``.

    The probe is fit once on base-model embeddings of the labelled probe sentences; the trait
    score is its mean P(positive) over the neutral held-out sentences; retrieval is the share of
    neutral sentences (embedded at ``c``) whose nearest paraphrase (embedded at ``c = 0``) is
    their own.
    """

    trait = "p_positive"
    coherence = ("cosine", "retrieval")

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        data: DataBundle,
        max_length: int,
        batch_size: int,
        probe_l2: float,
        probe_steps: int,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.neutral = data.neutral
        probe_x = self._embed(data.probe_texts)
        probe_y = torch.tensor(data.probe_labels)
        self.probe = fit_probe(probe_x, probe_y, probe_l2, probe_steps)
        self.probe_accuracy = float(
            ((self.probe.logits(probe_x) > 0).long() == probe_y).float().mean()
        )
        self.base = self._embed(self.neutral)  # (n, d)
        self.paraphrases = self._embed(data.paraphrases) if data.paraphrases else None

    def _embed(self, texts: list[str]) -> Tensor:
        return embed_all(self.model, self.tokenizer, texts, self.max_length, self.batch_size)

    @torch.no_grad()
    def __call__(self, adapter, c: float) -> dict:
        if c == 0 or adapter is None:
            emb = self._embed(self.neutral)
        else:
            with adapter(self.model, c=float(c)):
                emb = self._embed(self.neutral)
        row = {
            "c": float(c),
            "p_positive": float(self.probe.prob(emb).mean()),
            "cosine": float((emb * self.base).sum(-1).mean()),
        }
        if self.paraphrases is not None:
            hits = (emb @ self.paraphrases.T).argmax(1) == torch.arange(len(self.neutral))
            row["retrieval"] = float(hits.float().mean())
        return row

    def passes(self, row: dict, base: dict, gates) -> bool:
        ok = row["cosine"] >= gates.min_cosine
        if "retrieval" in row:
            ok = ok and row["retrieval"] >= base["retrieval"] - gates.max_retrieval_drop
        return ok


class CausalMeter:
    """Held-out chosen-vs-rejected margin, completion NLL and KL to ``c = 0`` at any ``c``.

    ``margin`` is the mean over held-out pairs of ``nll(rejected) − nll(chosen)`` (per-token
    log-probability margin); ``nll`` the mean per-token NLL of both completions; ``kl`` the mean
    full-vocabulary ``KL(p_c ‖ p_0)`` per completion token.
    """

    trait = "margin"
    coherence = ("nll", "kl")

    def __init__(
        self, model: nn.Module, tokenizer, data: DataBundle, max_length: int, batch_size: int
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.batches = []
        pairs = data.heldout
        for i in range(0, len(pairs), batch_size):
            cho, rej = pair_batches(tokenizer, pairs[i : i + batch_size], max_length)
            self.batches.append((cho.to(self.device), rej.to(self.device)))
        with torch.no_grad():
            self.base = [
                (next_token_logits(model, cho), next_token_logits(model, rej))
                for cho, rej in self.batches
            ]

    @torch.no_grad()
    def __call__(self, adapter, c: float) -> dict:
        margins, nlls, kls = [], [], []
        for (cho, rej), (base_cho, base_rej) in zip(self.batches, self.base, strict=True):
            if c == 0 or adapter is None:
                lc, lr = next_token_logits(self.model, cho), next_token_logits(self.model, rej)
            else:
                with adapter(self.model, c=float(c)):
                    lc, lr = next_token_logits(self.model, cho), next_token_logits(self.model, rej)
            nc, nr = token_nll(lc, cho), token_nll(lr, rej)
            margins.append(nr - nc)
            nlls.append(torch.cat([nc, nr]))
            kls.append(masked_mean(position_kl(lc, base_cho, None), cho.completion[:, 1:]))
            kls.append(masked_mean(position_kl(lr, base_rej, None), rej.completion[:, 1:]))
        return {
            "c": float(c),
            "margin": float(torch.cat(margins).mean()),
            "nll": float(torch.cat(nlls).mean()),
            "kl": float(torch.stack(kls).mean()),
        }

    def passes(self, row: dict, base: dict, gates) -> bool:
        return row["nll"] <= base["nll"] + gates.max_nll_increase and row["kl"] <= gates.max_kl
