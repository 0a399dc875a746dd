"""The records ``conf/adapter/*.yaml`` instantiate: an adapter kind's keys, typed, and ``build``.

``hydra.utils.instantiate(cfg.adapter)`` gives a :class:`LoRAConfig` or a :class:`PiSSAConfig`
(``_target_`` in the yaml); ``config.build(model, tokenizer, data, ...)`` makes the adapter. The
start-up check merges the config into the same record (types) and calls ``validate`` (ranges,
modlora's own choices and layer-range rule). Fields hold what the yaml holds (``init`` a string,
``alpha`` an int or a float), so instantiating gives the same values the run always read.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from torch import nn

import modlora as ml
from modlora.blocks import check_layer_range
from modlora.lora import INITS

from .checks import ConfigError, bounded, one_of, require
from .datasets import DataBundle
from .encoding import encoder_inputs
from .tokenization import tokenize_completions


@dataclass(kw_only=True)
class AdapterConfig:
    """Keys every adapter kind has.

    ``kind`` names the kind (stored with the run, checked against a resumed file); ``lr`` is the
    kind's own AdamW learning rate (``train.lr`` defaults to it), read by the training loop.
    """

    kind: str
    r: int
    targets: list[str]
    exclude: list[str]
    layer_range: list[Any] | None  # two fractions or two block indices (modlora checks which)
    lr: float

    def validate(self, key: str = "adapter") -> None:
        """Range checks the types cannot express; errors name ``<key>.<field>``."""
        if self.kind != type(self).kind:
            raise ConfigError(
                f"{key}.kind={self.kind!r} but {key}._target_ builds a {type(self).kind!r} adapter"
            )
        bounded(f"{key}.lr", self.lr, 0, lo_open=True)
        bounded(f"{key}.r", self.r, 1)
        if self.layer_range is not None:
            try:
                check_layer_range(tuple(self.layer_range))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{key}.layer_range: {err}") from None
        require(len(self.targets) > 0, f"{key}.targets", "must name at least one pattern")

    def selection(self) -> dict:
        """``targets`` / ``exclude`` / ``layer_range`` as modlora takes them."""
        return {
            "targets": tuple(self.targets),
            "exclude": tuple(self.exclude),
            "layer_range": None if self.layer_range is None else tuple(self.layer_range),
        }


@dataclass(kw_only=True)
class LoRAConfig(AdapterConfig):
    """``conf/adapter/lora.yaml``: a :class:`~modlora.ModulatedLoRA`."""

    kind: str = "lora"
    alpha: float | int
    dropout: float
    init: str

    def validate(self, key: str = "adapter") -> None:
        super().validate(key)
        bounded(f"{key}.alpha", self.alpha, 0, lo_open=True)
        bounded(f"{key}.dropout", self.dropout, 0, 0.999)
        one_of(f"{key}.init", self.init, INITS)

    def build(
        self, model: nn.Module, tokenizer, data: DataBundle, **calibration
    ) -> ml.ModulatedLoRA:
        """A fresh adapter on ``model`` (``tokenizer``, ``data``, ``calibration``: unused)."""
        return ml.ModulatedLoRA(
            model,
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            init=self.init,
            **self.selection(),
        )


@dataclass(kw_only=True)
class PiSSAConfig(AdapterConfig):
    """``conf/adapter/pissa.yaml``: a :class:`~modlora.ModulatedPiSSA`."""

    kind: str = "pissa"
    selection_score: str
    delta_s_init: float

    def validate(self, key: str = "adapter") -> None:
        super().validate(key)
        bounded(f"{key}.delta_s_init", self.delta_s_init)
        one_of(f"{key}.selection_score", self.selection_score, ml.SELECTION_SCORES)

    def build(
        self,
        model: nn.Module,
        tokenizer,
        data: DataBundle,
        *,
        encoder: bool,
        max_length: int,
        batch_size: int,
    ) -> ml.ModulatedPiSSA:
        """A fresh adapter on ``model``; the activation-driven scores calibrate on the training
        split's texts (``encoder``: whole sentences; else the completion tokens), ``batch_size``
        rows of at most ``max_length`` tokens at a time."""
        selection = self.selection()
        calibration = None
        if self.selection_score != "s_only":
            layout = ml.find_targets(model, **selection)
            inputs = _encoder_batches if encoder else _causal_batches
            cho, rej = (
                inputs(model, tokenizer, data.train, side, max_length, batch_size)
                for side in ("chosen", "rejected")
            )
            if self.selection_score == "cho_rej_min_std":
                calibration = ml.collect_calibration(model, layout, cho, rejected=rej)
            else:
                calibration = ml.collect_calibration(model, layout, chain(cho, rej))
        return ml.ModulatedPiSSA(
            model,
            r=self.r,
            selection_score=self.selection_score,
            calibration=calibration,
            delta_s_init=self.delta_s_init,
            **selection,
        )


def _encoder_batches(model, tokenizer, pairs, side: str, max_length: int, bs: int) -> Iterator:
    """``prompt + <side>`` sentences, padded per batch."""
    texts = [p.prompt + getattr(p, side) for p in pairs]
    yield from encoder_inputs(tokenizer, texts, max_length, bs, next(model.parameters()).device)


def _causal_batches(model, tokenizer, pairs, side: str, max_length: int, bs: int) -> Iterator:
    """``prompt + <side>`` rows; only the completion tokens are calibrated on."""
    device = next(model.parameters()).device
    for i in range(0, len(pairs), bs):
        chunk = pairs[i : i + bs]
        b = tokenize_completions(
            tokenizer,
            [p.prompt for p in chunk],
            [getattr(p, side) for p in chunk],
            max_length,
        ).to(device)
        yield {
            "input_ids": b.ids,
            "attention_mask": b.attention,
            "calibration_mask": b.completion.long(),
        }
