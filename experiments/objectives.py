"""Training objectives: ``encoder`` (embedding steering), ``bidirectional`` and ``heal`` (causal LMs).

Each objective owns its batching and returns named loss *terms* per batch; the trainer sums them
(or applies PCGrad to the terms listed in ``pcgrad_terms``). ``+C`` and ``−C`` rows share one
forward through the per-sample coefficient: ``with adapter(model, c=torch.tensor([+C, ..., −C]))``.

* ``encoder``: the trait axis ``u`` is the unit mean of ``emb(chosen) − emb(rejected)`` over the
  training split on the base model (normalised mean-pooled embeddings) and ``g`` the length of
  that mean. At coefficient ``c`` the change ``d = emb_c − emb_0`` of every training sentence is
  split into ``p = d·u`` and ``o = d − p u``; the loss is
  ``((p − c·shift·g)² + barrier · relu(|o|² − (margin·shift·g)²)) / (shift·g)²``.
* ``bidirectional``: ``L+ = nll(cho|+C) − ñll(rej|+C)``, ``L− = nll(rej|−C) − ñll(cho|−C)`` with
  ``ñll = nll / max(detach(nll), 1)``, plus ``β · KL(p_c ‖ p_0)`` on the base model's top-K
  tokens (renormalised over the K, fp32, completion tokens only).
* ``heal``: ``nll(cho|+C) + λ · relu(D − τ)`` with ``D`` the per-position ``KL(p_c ‖ p_anchor)``
  aggregated by mean | rmse | p95 | max; the anchor is the base model (``base``) or the model
  with the kept rounds' history attached (``prev``).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .datasets import DataBundle, Pair

AGGREGATES = ("mean", "rmse", "p95", "max")


# ====================================================================== encoders
def mean_pool(
    hidden: Float[Tensor, "batch seq d"], mask: Int[Tensor, "batch seq"]
) -> Float[Tensor, "batch d"]:
    """Mean of the hidden states over the non-padding tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


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


class EncoderObjective:
    """Move the pooled embedding along the trait axis in the sign of ``c``, keep the rest.

    Args:
        model, tokenizer: the base encoder (the adapter must be detached while this is built).
        adapter: the adapter being trained.
        data: train / val pairs (``prompt + chosen`` vs ``prompt + rejected``).
        shift: target move along the axis at ``|c| = 1``, in units of the chosen−rejected gap.
        barrier: weight of the penalty on the change orthogonal to the axis.
        margin: orthogonal change allowed for free, in units of the target move.
        train_c: the ``C`` of the ``+C`` / ``−C`` training rows.
        max_length: tokens per sentence.
    """

    name = "encoder"
    pcgrad_terms: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        adapter,
        data: DataBundle,
        shift: float,
        barrier: float,
        margin: float,
        train_c: float,
        max_length: int,
    ) -> None:
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.barrier, self.margin, self.train_c, self.max_length = (
            barrier,
            margin,
            train_c,
            max_length,
        )
        self.texts, self.base = {}, {}
        for split, pairs in (("train", data.train), ("val", data.val)):
            texts = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
            self.texts[split] = texts
            self.base[split] = embed_all(model, tokenizer, texts, max_length)  # (2n, d)
        n = len(data.train)
        diff = self.base["train"][:n] - self.base["train"][n:]  # (n, d)
        mean = diff.mean(0)
        self.gap = float(mean.norm())
        self.axis = mean / self.gap  # (d,) unit trait axis
        self.target = shift * self.gap

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None
    ) -> Iterator[Tensor]:
        """Index batches over the split's sentences (shuffled when a generator is given)."""
        n = len(self.texts[split])
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        yield from order.split(batch_size)

    def n_batches(self, split: str, batch_size: int) -> int:
        return math.ceil(len(self.texts[split]) / batch_size)

    def terms(self, idx: Int[Tensor, " batch"], split: str = "train") -> dict[str, Tensor]:
        """``{"move", "barrier"}`` for ``+C`` and ``−C`` rows of the sentences ``idx``."""
        texts = [self.texts[split][i] for i in idx.tolist()]
        b = len(texts)
        c = torch.cat([torch.full((b,), self.train_c), torch.full((b,), -self.train_c)])  # (2b,)
        base = self.base[split][idx].repeat(2, 1)  # (2b, d)
        with self.adapter(self.model, c=c):
            emb = embed(self.model, self.tokenizer, texts + texts, self.max_length).cpu()
        return self.loss_terms(emb, base, c)

    def loss_terms(
        self, emb: Float[Tensor, "rows d"], base: Float[Tensor, "rows d"], c: Float[Tensor, " rows"]
    ) -> dict[str, Tensor]:
        """The two loss terms for embeddings ``emb`` at coefficients ``c`` (``base`` at ``c=0``)."""
        d = emb - base
        p = d @ self.axis  # (rows,)
        o = d - p[:, None] * self.axis  # (rows, d)
        t2 = self.target**2
        move = ((p - c * self.target) ** 2).mean() / t2
        slack = (self.margin * self.target) ** 2
        barrier = self.barrier * F.relu(o.pow(2).sum(-1) - slack).mean() / t2
        return {"move": move, "barrier": barrier}


# ====================================================================== causal LMs
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

    def repeat(self, n: int) -> "CausalBatch":
        return CausalBatch(
            self.ids.repeat(n, 1), self.attention.repeat(n, 1), self.completion.repeat(n, 1)
        )


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def tokenize_completions(
    tokenizer, prompts: list[str], completions: list[str], max_length: int, seq: int | None = None
) -> CausalBatch:
    """Tokenise ``prompt + completion`` rows, right-padded to ``seq`` (or the longest row).

    The prompt is cut from the left when a row is longer than ``max_length``; the completion
    always keeps at least one token.
    """
    rows, masks = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        c = tokenizer.encode(completion, add_special_tokens=False)[: max_length - 1]
        p = p[max(0, len(p) + len(c) - max_length) :]
        rows.append(p + c)
        masks.append([False] * len(p) + [True] * len(c))
    width = max(seq or 0, max(len(r) for r in rows))
    pad = _pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    completion = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        completion[i, : len(row)] = torch.tensor(mask)
    return CausalBatch(ids, attention, completion)


def pair_batches(tokenizer, pairs: list[Pair], max_length: int) -> tuple[CausalBatch, CausalBatch]:
    """Chosen and rejected rows of ``pairs``, padded to one common length."""
    prompts = [p.prompt for p in pairs]
    cho = tokenize_completions(tokenizer, prompts, [p.chosen for p in pairs], max_length)
    rej = tokenize_completions(tokenizer, prompts, [p.rejected for p in pairs], max_length)
    seq = max(cho.ids.shape[1], rej.ids.shape[1])
    cho = tokenize_completions(tokenizer, prompts, [p.chosen for p in pairs], max_length, seq)
    rej = tokenize_completions(tokenizer, prompts, [p.rejected for p in pairs], max_length, seq)
    return cho, rej


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


def sequence_logprob(
    logits: Float[Tensor, "batch seq_1 vocab"], batch: CausalBatch
) -> Float[Tensor, " batch"]:
    """Summed log-probability of each row's completion tokens."""
    target = batch.ids[:, 1:]
    mask = batch.completion[:, 1:].float()
    logp = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (batch, seq-1)
    return (logp * mask).sum(1)


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

    Args:
        beta: weight of the top-K KL to the base model.
        top_k: K (``None``: the full vocabulary).
        pcgrad: project the conflicting parts of the ``L+`` and ``L−`` gradients (PCGrad).
    """

    name = "bidirectional"

    def __init__(
        self,
        model,
        tokenizer,
        adapter,
        data,
        train_c,
        max_length,
        beta: float,
        top_k: int | None,
        pcgrad: bool,
    ):
        super().__init__(model, tokenizer, adapter, data, train_c, max_length)
        self.beta, self.top_k = beta, top_k
        self.pcgrad_terms = ("plus", "minus") if pcgrad else ()

    def terms(self, pairs: list[Pair], split: str = "train") -> dict[str, Tensor]:
        cho, rej = pair_batches(self.tokenizer, pairs, self.max_length)
        b = len(pairs)
        with torch.no_grad():
            base = next_token_logits(self.model, _cat(cho, rej).to(self.device))  # (2b, seq-1, V)
        rows = _cat(cho, rej, rej, cho).to(self.device)  # (4b, seq)
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

    Args:
        lam: weight λ of the KL barrier.
        tau: KL allowed for free (τ).
        aggregate: ``mean`` | ``rmse`` | ``p95`` | ``max`` over completion positions.
        anchor: ``base`` (kept rounds switched off) or ``prev`` (kept rounds on).
        top_k: K of the KL (``None``: the full vocabulary).
        history: the kept rounds (a :class:`~modlora.HistoryBake` attached to ``model``) or None.
    """

    name = "heal"

    def __init__(
        self,
        model,
        tokenizer,
        adapter,
        data,
        train_c,
        max_length,
        lam: float,
        tau: float,
        aggregate: str,
        anchor: str,
        top_k: int | None,
        history=None,
    ):
        super().__init__(model, tokenizer, adapter, data, train_c, max_length)
        if aggregate not in AGGREGATES:
            raise ValueError(f"objective.aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if anchor not in ("base", "prev"):
            raise ValueError(f"objective.anchor must be 'base' or 'prev', got {anchor!r}")
        self.lam, self.tau, self.aggregate, self.anchor, self.top_k = (
            lam,
            tau,
            aggregate,
            anchor,
            top_k,
        )
        self.history = history

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


def _cat(*batches: CausalBatch) -> CausalBatch:
    return CausalBatch(
        torch.cat([b.ids for b in batches]),
        torch.cat([b.attention for b in batches]),
        torch.cat([b.completion for b in batches]),
    )
