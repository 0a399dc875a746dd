"""Build the pieces a config names: model, adapter, objective, meters and baselines."""

import torch
from hydra.utils import instantiate
from loguru import logger
from omegaconf import OmegaConf
from torch import nn

import modlora as ml

from .datasets import DataBundle
from .encoding import embed_all
from .metrics import CausalMeter, EncoderMeter, fit_probe
from .steering import build_baselines


def load_model(cfg) -> tuple[nn.Module, object]:
    """Instantiate ``model.loader`` and move the model to ``device`` (unless it has a device map)."""
    model, tokenizer = instantiate(cfg.model.loader)
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(cfg.device)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def build_adapter(cfg, model: nn.Module, tokenizer, data: DataBundle) -> ml.LowRankAdapter:
    """A fresh adapter as ``cfg.adapter`` describes (its ``_target_``: the kind's config record)."""
    return instantiate(cfg.adapter, _convert_="all").build(
        model,
        tokenizer,
        data,
        encoder=cfg.model.kind == "encoder",
        max_length=cfg.model.max_length,
        batch_size=cfg.eval.batch_size,
    )


def build_objective(cfg, model, tokenizer, adapter, data: DataBundle, history=None):
    """The objective ``cfg.objective`` describes (its ``_target_``: the objective's config
    record), bound to ``adapter``; ``history``: the kept heal rounds."""
    config = instantiate(cfg.objective, _convert_="all")
    return config.build(model, tokenizer, adapter, data, cfg.model.max_length, history)


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
