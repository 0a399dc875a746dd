"""Build the pieces a config names: model, adapter, objective, meters and baselines."""

import torch
from hydra.utils import instantiate
from loguru import logger
from omegaconf import OmegaConf
from torch import nn

import modlora as ml

from .datasets import DataBundle
from .metrics import CausalMeter, EncoderMeter, fit_probe
from .objectives import (
    BidirectionalObjective,
    EncoderObjective,
    HealObjective,
    embed_all,
    tokenize_completions,
)
from .steering import build_baselines


def load_model(cfg) -> tuple[nn.Module, object]:
    """Instantiate ``model.loader`` and move the model to ``device`` (unless it has a device map)."""
    model, tokenizer = instantiate(cfg.model.loader)
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(cfg.device)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def _layer_range(value):
    return None if value is None else tuple(value)


def _calibration(cfg, model, tokenizer, data: DataBundle, layout):
    """Calibration inputs for activation-driven PiSSA scores: the training split's texts."""
    device = next(model.parameters()).device
    score = cfg.adapter.selection_score
    bs = cfg.eval.batch_size
    pairs = data.train
    if cfg.model.kind == "encoder":

        def batches(texts):
            for i in range(0, len(texts), bs):
                enc = tokenizer(
                    texts[i : i + bs],
                    padding=True,
                    truncation=True,
                    max_length=cfg.model.max_length,
                    return_tensors="pt",
                ).to(device)
                yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        cho = [p.prompt + p.chosen for p in pairs]
        rej = [p.prompt + p.rejected for p in pairs]
    else:

        def batches(side):
            for i in range(0, len(pairs), bs):
                chunk = pairs[i : i + bs]
                b = tokenize_completions(
                    tokenizer,
                    [p.prompt for p in chunk],
                    [getattr(p, side) for p in chunk],
                    cfg.model.max_length,
                ).to(device)
                yield {
                    "input_ids": b.ids,
                    "attention_mask": b.attention,
                    "calibration_mask": b.completion.long(),
                }

        cho, rej = "chosen", "rejected"
    if score == "cho_rej_min_std":
        return ml.collect_calibration(model, layout, batches(cho), rejected=batches(rej))
    return ml.collect_calibration(model, layout, _chain(batches(cho), batches(rej)))


def _chain(*iterables):
    for it in iterables:
        yield from it


def build_adapter(cfg, model: nn.Module, tokenizer, data: DataBundle) -> ml.LowRankAdapter:
    """A fresh ``ModulatedLoRA`` or ``ModulatedPiSSA`` as ``cfg.adapter`` describes."""
    a = cfg.adapter
    common = dict(
        targets=tuple(a.targets) if not isinstance(a.targets, str) else a.targets,
        exclude=tuple(a.exclude) if not isinstance(a.exclude, str) else a.exclude,
        layer_range=_layer_range(a.layer_range),
    )
    if a.kind == "lora":
        return ml.ModulatedLoRA(
            model, r=a.r, alpha=a.alpha, dropout=a.dropout, init=a.init, **common
        )
    calibration = None
    if a.selection_score != "s_only":
        layout = ml.find_targets(model, **common)
        calibration = _calibration(cfg, model, tokenizer, data, layout)
    return ml.ModulatedPiSSA(
        model,
        r=a.r,
        selection_score=a.selection_score,
        calibration=calibration,
        delta_s_init=a.delta_s_init,
        **common,
    )


def build_objective(cfg, model, tokenizer, adapter, data: DataBundle, history=None):
    """The objective ``cfg.objective.name`` names, bound to ``adapter``."""
    o = cfg.objective
    max_length = cfg.model.max_length
    if o.name == "encoder":
        return EncoderObjective(
            model, tokenizer, adapter, data, o.shift, o.barrier, o.margin, o.train_c, max_length
        )
    if o.name == "bidirectional":
        return BidirectionalObjective(
            model, tokenizer, adapter, data, o.train_c, max_length, o.beta, o.top_k, o.pcgrad
        )
    return HealObjective(
        model,
        tokenizer,
        adapter,
        data,
        o.train_c,
        max_length,
        o.lam,
        o.tau,
        o.aggregate,
        o.anchor,
        o.top_k,
        history,
    )


def build_meters(cfg, model, tokenizer, data: DataBundle) -> dict:
    """The evaluation meters, each on its own items (computes their ``c = 0`` references now).

    ``test``: the reported set (encoders: the neutral held-out sentences with the probe;
    causal: the held-out pairs). ``opinionated`` (encoders): the opinionated held-out sentences.
    ``val``: the validation split, the only set the calibration measures. Encoders also get
    ``probe_accuracy`` (on the probe's own training sentences).
    """
    e, max_length = cfg.eval, cfg.model.max_length
    if cfg.model.kind != "encoder":
        return {
            "test": CausalMeter(model, tokenizer, data.heldout, max_length, e.batch_size),
            "val": CausalMeter(model, tokenizer, data.val, max_length, e.batch_size),
        }
    probe_x = embed_all(model, tokenizer, data.probe_texts, max_length, e.batch_size)
    probe_y = torch.tensor(data.probe_labels)
    probe = fit_probe(probe_x, probe_y, e.probe_l2, e.probe_steps)
    accuracy = float(((probe.logits(probe_x) > 0).long() == probe_y).float().mean())

    def meter(texts, with_probe=True, paraphrases=None):
        p = probe if with_probe else None
        return EncoderMeter(model, tokenizer, texts, max_length, e.batch_size, p, paraphrases)

    val_texts = [p.prompt + p.chosen for p in data.val] + [p.prompt + p.rejected for p in data.val]
    meters = {
        "test": meter(data.neutral, paraphrases=data.paraphrases),
        "val": meter(val_texts, with_probe=False),
        "probe_accuracy": accuracy,
    }
    if data.opinionated:
        meters["opinionated"] = meter(data.opinionated)
    return meters


def build_methods(cfg, model, tokenizer, data: DataBundle, adapter) -> dict:
    """``{"adapter": adapter, <baseline name>: SteeringVector, ...}`` (``eval.baselines``)."""
    b = cfg.eval.baselines
    vectors = build_baselines(
        model,
        tokenizer,
        data,
        cfg.model.kind,
        list(b.methods),
        b.mid_block,
        cfg.seed,
        cfg.model.max_length,
        cfg.eval.batch_size,
    )
    return {"adapter": adapter, **vectors}


def set_threads(threads) -> None:
    if threads is not None:
        torch.set_num_threads(int(threads))
        logger.info("torch threads: {}", threads)


def config_dict(cfg) -> dict:
    """The resolved config as plain containers (stored in metrics.json and the adapter)."""
    return OmegaConf.to_container(cfg, resolve=True)
