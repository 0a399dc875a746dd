"""Measurements at one coefficient: the encoder probe / cosine / retrieval and the causal margin / NLL / KL.

A ``*Meter`` holds one set of items (sentences or pairs) and precomputes everything at ``c = 0``
once (base embeddings and probe logits, base next-token logits). ``meter.stats(method, c)``
returns per-item statistics (:mod:`experiments.stats`) for any method used as
``with method(model, c=c)`` (an adapter or a steering vector); ``meter(method, c)`` the row of
their values. The grid sweep, the frontier search and the calibration share the meters; each
meter only ever embeds its own items (the calibration meter holds the validation split).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .datasets import Pair
from .encoding import embed_all
from .losses import next_token_logits, position_kl, token_nll
from .stats import Stat, flip_stat, mean_stat, value
from .tokenization import pair_batches


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


def _sign(c: float) -> float:
    return 1.0 if c > 0 else -1.0


def row_of(c: float, stats: dict[str, Stat]) -> dict:
    """``{"c": c, name: value}`` for every statistic."""
    return {"c": float(c), **{k: value(v) for k, v in stats.items()}}


class EncoderMeter:
    """Probe trait score, cosine to ``c = 0`` and paraphrase retrieval on one set of sentences.

    ``p_positive`` is the probe's mean P(positive), ``logit_shift`` the mean change of the probe
    logit from ``c = 0``, ``flip_rate`` the share of sentences not on the side of ``sign(c)`` at
    ``c = 0`` that the probe puts there at ``c``; ``cosine`` the mean cosine of each embedding to
    its own ``c = 0`` embedding; ``retrieval`` the share of sentences whose nearest paraphrase
    (at ``c = 0``) is their own (kept in the JSON; it saturates and is not evidence).

    Args:
        texts: the sentences measured.
        probe: the trait probe (``None``: cosine only, as for the calibration split).
        paraphrases: one per sentence (``None``: no retrieval).
    """

    trait = "p_positive"
    shift = "logit_shift"
    coherence = ("cosine", "retrieval")
    frontier_key = "cosine"  # coherence the frontier holds fixed (higher is better)
    higher_is_better = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        texts: list[str],
        max_length: int,
        batch_size: int,
        probe: Probe | None = None,
        paraphrases: list[str] | None = None,
    ):
        if not texts:
            raise ValueError("EncoderMeter needs at least one sentence")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.texts, self.probe = list(texts), probe
        self.base = self._embed(self.texts)  # (n, d)
        self.base_logits = probe.logits(self.base) if probe is not None else None  # (n,)
        self.paraphrases = self._embed(paraphrases) if paraphrases else None

    def __len__(self) -> int:
        return len(self.texts)

    def _embed(self, texts: list[str]) -> Tensor:
        return embed_all(self.model, self.tokenizer, texts, self.max_length, self.batch_size)

    @torch.no_grad()
    def stats(self, method, c: float) -> dict[str, Stat]:
        if c == 0 or method is None:
            emb = self.base
        else:
            with method(self.model, c=float(c)):
                emb = self._embed(self.texts)
        out = {}
        if self.probe is not None:
            logits = self.probe.logits(emb)  # (n,)
            out["p_positive"] = mean_stat(torch.sigmoid(logits))
            out["logit_shift"] = mean_stat(logits - self.base_logits)
            if c != 0:
                out["flip_rate"] = flip_stat(self.base_logits, logits, _sign(c))
        out["cosine"] = mean_stat((emb * self.base).sum(-1))
        if self.paraphrases is not None:
            hits = (emb @ self.paraphrases.T).argmax(1) == torch.arange(len(self.texts))
            out["retrieval"] = mean_stat(hits.float())
        return out

    def __call__(self, method, c: float) -> dict:
        return row_of(c, self.stats(method, c))

    def passes(self, row: dict, base: dict, gates) -> bool:
        return row["cosine"] >= gates.min_cosine


class CausalMeter:
    """Chosen-vs-rejected margin, completion NLL and KL to ``c = 0`` on one set of pairs.

    Per pair: ``margin = nll(rejected) − nll(chosen)`` (mean per-token NLLs, so a positive margin
    prefers the chosen completion), ``margin_shift`` its change from ``c = 0``, ``flip_rate`` the
    share of pairs whose preference is not on the side of ``sign(c)`` at ``c = 0`` and is at
    ``c``; ``nll`` the mean of both completions' NLL, ``kl`` the mean over both completions of
    the mean full-vocabulary ``KL(p_c ‖ p_0)`` per completion token.
    """

    trait = "margin"
    shift = "margin_shift"
    coherence = ("nll", "kl")
    frontier_key = "kl"  # coherence the frontier holds fixed (lower is better)
    higher_is_better = False

    def __init__(
        self, model: nn.Module, tokenizer, pairs: list[Pair], max_length: int, batch_size: int
    ):
        if not pairs:
            raise ValueError("CausalMeter needs at least one pair")
        self.model = model
        self.device = next(model.parameters()).device
        self.batches = []
        for i in range(0, len(pairs), batch_size):
            cho, rej = pair_batches(tokenizer, pairs[i : i + batch_size], max_length)
            self.batches.append((cho.to(self.device), rej.to(self.device)))
        self.n = len(pairs)
        with torch.no_grad():
            self.base = [
                (next_token_logits(model, cho), next_token_logits(model, rej))
                for cho, rej in self.batches
            ]
        self.base_margin = self._margin_nll_kl(None, 0.0)[0]

    def __len__(self) -> int:
        return self.n

    @torch.no_grad()
    def _margin_nll_kl(self, method, c: float) -> tuple[Tensor, Tensor, Tensor]:
        margins, nlls, kls = [], [], []
        for (cho, rej), (base_cho, base_rej) in zip(self.batches, self.base, strict=True):
            if c == 0 or method is None:
                lc, lr = base_cho, base_rej
            else:
                with method(self.model, c=float(c)):
                    lc, lr = next_token_logits(self.model, cho), next_token_logits(self.model, rej)
            nc, nr = token_nll(lc, cho), token_nll(lr, rej)  # (batch,)
            margins.append(nr - nc)
            nlls.append((nc + nr) / 2)
            kl_c = _row_mean(position_kl(lc, base_cho, None), cho.completion[:, 1:])
            kl_r = _row_mean(position_kl(lr, base_rej, None), rej.completion[:, 1:])
            kls.append((kl_c + kl_r) / 2)
        return torch.cat(margins).cpu(), torch.cat(nlls).cpu(), torch.cat(kls).cpu()

    def stats(self, method, c: float) -> dict[str, Stat]:
        margin, nll, kl = self._margin_nll_kl(method, c)
        out = {"margin": mean_stat(margin), "margin_shift": mean_stat(margin - self.base_margin)}
        if c != 0:
            out["flip_rate"] = flip_stat(self.base_margin, margin, _sign(c))
        out["nll"], out["kl"] = mean_stat(nll), mean_stat(kl)
        return out

    def __call__(self, method, c: float) -> dict:
        return row_of(c, self.stats(method, c))

    def passes(self, row: dict, base: dict, gates) -> bool:
        return row["nll"] <= base["nll"] + gates.max_nll_increase and row["kl"] <= gates.max_kl


def _row_mean(values: Float[Tensor, "batch seq_1"], mask: Bool[Tensor, "batch seq_1"]) -> Tensor:
    m = mask.float()
    return (values * m).sum(1) / m.sum(1).clamp_min(1.0)  # (batch,)
