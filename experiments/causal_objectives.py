"""The causal-LM objectives: ``bidirectional`` and ``heal``.

Each objective owns its batching and returns named loss *terms* per batch; the trainer sums them
(or applies PCGrad to the terms listed in ``pcgrad_terms``).

* ``bidirectional``: ``L+ = nll(cho|+C) − ñll(rej|+C)``, ``L− = nll(rej|−C) − ñll(cho|−C)`` with
  ``ñll = nll / max(detach(nll), 1)``, plus ``β · KL(p_c ‖ p_0)`` on the base model's top-K
  tokens (renormalised over the K, fp32, completion tokens only). ``+C`` and ``−C`` rows share
  one forward through the per-sample coefficient: ``with adapter(model, c=torch.tensor([+C, ..., −C]))``.
* ``heal``: ``nll(cho|+C) + λ · relu(D − τ)`` with ``D`` the per-position ``KL(p_c ‖ p_anchor)``
  aggregated by mean | rmse | p95 | max; the anchor is the base model (``base``) or the model
  with the kept rounds' history attached (``prev``).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import bounded, one_of
from .datasets import DataBundle, Pair
from .losses import (
    AGGREGATES,
    aggregate_positions,
    masked_mean,
    next_token_logits,
    position_kl,
    soft_nll,
    token_nll,
)
from .objective_config import ObjectiveConfig, check_top_k
from .tokenization import concat, pair_batches, tokenize_completions

ANCHORS = ("base", "prev")


@dataclass(kw_only=True)
class BidirectionalConfig(ObjectiveConfig):
    """``conf/objective/bidirectional.yaml``: see :class:`BidirectionalObjective`."""

    name: str = "bidirectional"
    beta: float
    top_k: int | None
    pcgrad: bool
    model_kind: ClassVar[str] = "causal"

    def validate(self, key: str = "objective") -> None:
        super().validate(key)
        bounded(f"{key}.beta", self.beta, 0)
        check_top_k(f"{key}.top_k", self.top_k)

    def build(self, model, tokenizer, adapter, data, max_length, history=None):
        return BidirectionalObjective(model, tokenizer, adapter, data, self, max_length)


@dataclass(kw_only=True)
class HealConfig(ObjectiveConfig):
    """``conf/objective/heal.yaml``: see :class:`HealObjective`; ``rounds`` is read by the
    training loop (:func:`experiments.train.train_heal_rounds`)."""

    name: str = "heal"
    lam: float
    tau: float
    aggregate: str
    anchor: str
    top_k: int | None
    rounds: int
    model_kind: ClassVar[str] = "causal"

    def validate(self, key: str = "objective") -> None:
        super().validate(key)
        bounded(f"{key}.lam", self.lam, 0)
        bounded(f"{key}.tau", self.tau, 0)
        bounded(f"{key}.rounds", self.rounds, 1)
        one_of(f"{key}.aggregate", self.aggregate, AGGREGATES)
        one_of(f"{key}.anchor", self.anchor, ANCHORS)
        check_top_k(f"{key}.top_k", self.top_k)

    def build(self, model, tokenizer, adapter, data, max_length, history=None):
        return HealObjective(model, tokenizer, adapter, data, self, max_length, history)


class _CausalBase:
    """Batching shared by the causal objectives (pairs, pre-tokenised per batch)."""

    pcgrad_terms: tuple[str, ...] = ()

    def __init__(
        self, model, tokenizer, adapter, data: DataBundle, train_c: float, max_length: int
    ):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.train_c, self.max_length = float(train_c), max_length
        self.pairs = {"train": data.train, "val": data.val}
        self.device = next(model.parameters()).device

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None
    ) -> Iterator[list[Pair]]:
        pairs = self.pairs[split]
        order = (
            torch.randperm(len(pairs), generator=generator)
            if generator is not None
            else torch.arange(len(pairs))
        )
        for idx in order.split(batch_size):
            yield [pairs[i] for i in idx.tolist()]

    def n_batches(self, split: str, batch_size: int) -> int:
        return math.ceil(len(self.pairs[split]) / batch_size)


class BidirectionalObjective(_CausalBase):
    """``L+ + L− + β·KL`` with ``+C`` and ``−C`` rows in one forward (see the module docstring).

    Args (of ``config``):
        beta: weight of the top-K KL to the base model.
        top_k: K (``None``: the full vocabulary).
        pcgrad: project the conflicting parts of the ``L+`` and ``L−`` gradients (PCGrad).
    """

    name = "bidirectional"

    def __init__(
        self, model, tokenizer, adapter, data, config: BidirectionalConfig, max_length: int
    ):
        super().__init__(model, tokenizer, adapter, data, config.train_c, max_length)
        self.beta, self.top_k = config.beta, config.top_k
        self.pcgrad_terms = ("plus", "minus") if config.pcgrad else ()

    def terms(self, pairs: list[Pair], split: str = "train") -> dict[str, Tensor]:
        cho, rej = pair_batches(self.tokenizer, pairs, self.max_length)
        b = len(pairs)
        with torch.no_grad():
            base = next_token_logits(self.model, concat(cho, rej).to(self.device))  # (2b, seq-1, V)
        rows = concat(cho, rej, rej, cho).to(self.device)  # (4b, seq)
        C = self.train_c
        c = torch.tensor([C] * (2 * b) + [-C] * (2 * b))
        with self.adapter(self.model, c=c):
            logits = next_token_logits(self.model, rows)  # (4b, seq-1, V)
        nll = token_nll(logits, rows)  # (4b,)
        cho_p, rej_p, rej_m, cho_m = nll.split(b)
        plus = (cho_p - soft_nll(rej_p)).mean()
        minus = (rej_m - soft_nll(cho_m)).mean()
        # reference rows in the order of `rows`: cho, rej, rej, cho
        ref = base[torch.cat([torch.arange(2 * b), torch.arange(b, 2 * b), torch.arange(b)])]
        kl = masked_mean(position_kl(logits, ref, self.top_k), rows.completion[:, 1:])
        return {"plus": plus, "minus": minus, "kl": self.beta * kl}


class HealObjective(_CausalBase):
    """``nll(cho|+C) + λ · relu(D − τ)``, ``D`` the aggregated KL to the anchor.

    Args (of ``config``, besides ``history``):
        lam: weight λ of the KL barrier.
        tau: KL allowed for free (τ).
        aggregate: ``mean`` | ``rmse`` | ``p95`` | ``max`` over completion positions.
        anchor: ``base`` (kept rounds switched off) or ``prev`` (kept rounds on).
        top_k: K of the KL (``None``: the full vocabulary).
        history: the kept rounds (a :class:`~modlora.HistoryBake` attached to ``model``) or None.
    """

    name = "heal"

    def __init__(
        self, model, tokenizer, adapter, data, config: HealConfig, max_length: int, history=None
    ):
        super().__init__(model, tokenizer, adapter, data, config.train_c, max_length)
        if config.anchor not in ANCHORS:
            raise ValueError(f"objective.anchor must be 'base' or 'prev', got {config.anchor!r}")
        self.lam, self.tau, self.top_k = config.lam, config.tau, config.top_k
        self.aggregate, self.anchor, self.history = config.aggregate, config.anchor, history

    def terms(self, pairs: list[Pair], split: str = "train") -> dict[str, Tensor]:
        cho = tokenize_completions(
            self.tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs], self.max_length
        ).to(self.device)
        with torch.no_grad():
            hist = self.history
            if hist is not None and self.anchor == "base":
                hist.enabled = False
            try:
                ref = next_token_logits(self.model, cho)
            finally:
                if hist is not None:
                    hist.enabled = True
        with self.adapter(self.model, c=self.train_c):
            logits = next_token_logits(self.model, cho)
        nll = token_nll(logits, cho).mean()
        mask = cho.completion[:, 1:]
        d = aggregate_positions(
            position_kl(logits, ref, self.top_k), mask, self.aggregate
        )  # (batch,)
        return {"nll": nll, "barrier": self.lam * F.relu(d - self.tau).mean()}
