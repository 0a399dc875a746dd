"""The encoder objective: move the pooled embedding along the trait axis in the sign of ``c``.

The trait axis ``u`` is the unit mean of ``emb(chosen) − emb(rejected)`` over the training split
on the base model (normalised mean-pooled embeddings) and ``g`` the length of that mean. At
coefficient ``c`` the change ``d = emb_c − emb_0`` of every training sentence is split into
``p = d·u`` and ``o = d − p u``; the loss is
``((p − c·shift·g)² + barrier · relu(|o|² − (margin·shift·g)²)) / (shift·g)²``. Every sentence is
run at ``+C`` and ``−C`` in one forward (per-sample ``c``).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .checks import bounded
from .datasets import DataBundle
from .encoding import embed, embed_all
from .objective_config import ObjectiveConfig


@dataclass(kw_only=True)
class EncoderConfig(ObjectiveConfig):
    """``conf/objective/encoder.yaml``: see :class:`EncoderObjective`."""

    name: str = "encoder"
    shift: float
    barrier: float
    margin: float
    model_kind: ClassVar[str] = "encoder"

    def validate(self, key: str = "objective") -> None:
        super().validate(key)
        bounded(f"{key}.shift", self.shift, 0, lo_open=True)
        bounded(f"{key}.barrier", self.barrier, 0)
        bounded(f"{key}.margin", self.margin, 0)

    def build(self, model, tokenizer, adapter, data, max_length, history=None):
        return EncoderObjective(model, tokenizer, adapter, data, self, max_length)


class EncoderObjective:
    """Move the pooled embedding along the trait axis in the sign of ``c``, keep the rest.

    Args:
        model, tokenizer: the base encoder (the adapter must be detached while this is built).
        adapter: the adapter being trained.
        data: train / val pairs (``prompt + chosen`` vs ``prompt + rejected``).
        config: ``shift`` (target move along the axis at ``|c| = 1``, in units of the
            chosen−rejected gap), ``barrier`` (weight of the penalty on the change orthogonal to
            the axis), ``margin`` (orthogonal change allowed for free, in units of the target
            move), ``train_c`` (the ``C`` of the ``+C`` / ``−C`` training rows).
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
        config: EncoderConfig,
        max_length: int,
    ) -> None:
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.barrier, self.margin = config.barrier, config.margin
        self.train_c, self.max_length = config.train_c, max_length
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
        self.target = config.shift * self.gap

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
