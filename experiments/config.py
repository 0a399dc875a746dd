"""Start-up checks of a composed config: every bad value fails here, naming its key.

:func:`validate` runs before any model is loaded or any data is tokenised, so a typo costs a
second, not a training run. Types come from structured configs: each group is merged into its
dataclass (:mod:`experiments.schema`; the adapter and objective groups into the record their
``_target_`` names), which also refuses unknown and missing keys. What types cannot say is
checked here or by the record's ``validate``: ranges, choices from modlora's own tuples,
``model.kind`` against the objective, files that must exist. The data files are read (cheap) so
an empty file or a malformed JSONL line is caught too, and the loaded
:class:`~experiments.datasets.DataBundle` is returned.
"""

import os
from pathlib import Path

from hydra.utils import get_class, get_method
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from modlora import read_metadata

from .adapters import AdapterConfig
from .causal_objectives import BidirectionalConfig, HealConfig
from .checks import ConfigError, bounded, require
from .datasets import DataBundle, DataError, load_data
from .encoder_objective import EncoderConfig
from .objective_config import ObjectiveConfig
from .schema import DATA_SCHEMAS, EvalSchema, ModelSchema, RunSchema, TrainSchema

__all__ = ["ConfigError", "validate"]

OBJECTIVE_CONFIGS = (EncoderConfig, BidirectionalConfig, HealConfig)


def _join(key: str, sub) -> str:
    sub = str(sub)
    return (
        key if not sub else f"{key}{sub}" if sub.startswith("[") else f"{key}.{sub}" if key else sub
    )


def _same(raw, typed, key: str) -> None:
    """The merge converts what it can ("yes" to True, "3" to 3); the run reads the raw value, so
    a value that needed converting is refused."""
    if isinstance(raw, dict):
        for k, v in raw.items():
            _same(v, typed[k], _join(key, k))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            _same(v, typed[i], f"{key}[{i}]")
    elif raw != typed or isinstance(raw, str) != isinstance(typed, str):
        raise ConfigError(f"{key} must be a {type(typed).__name__}, got {raw!r}")


def _typed(schema: type, value, key: str):
    """``value`` (plain containers) as an instance of the dataclass ``schema``; a wrong type, a
    missing or an unknown key raises :class:`ConfigError` naming it."""
    require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), value)
    except ConfigKeyError as err:
        raise ConfigError(
            f"{_join(key, err.full_key)}: not a key of {key} ({schema.__name__})"
        ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_join(key, err.full_key)}: {str(err).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{_join(key, missing[0])}: missing from the config")
    _same(value, OmegaConf.to_container(merged, enum_to_str=True), key)
    return OmegaConf.to_object(merged)


def _record(value, key: str, base: type):
    """The record ``<key>._target_`` names (a subclass of ``base``), filled from ``value``."""
    require(isinstance(value, dict) and "_target_" in value, f"{key}._target_", "is missing")
    target = value["_target_"]
    try:
        cls = get_class(target)
    except Exception as err:
        raise ConfigError(f"{key}._target_={target!r}: not found ({err})") from None
    require(
        issubclass(cls, base),
        f"{key}._target_",
        f"={target!r} is not a {base.__name__} ({base.__module__})",
    )
    return _typed(cls, {k: v for k, v in value.items() if k != "_target_"}, key)


def _resolved(cfg) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key}: {str(err).splitlines()[0]}") from None


def validate_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={device!r}: not a torch device ({err})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: no CUDA device on this machine (use device=cpu)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r}: MPS is not available on this machine")


def validate_model(model: ModelSchema) -> None:
    target = model.loader.get("_target_")
    try:
        get_method(target)
    except Exception as err:
        raise ConfigError(
            f"model.loader._target_={target!r}: unknown model loader ({err})"
        ) from None
    bounded("model.max_length", model.max_length, 1)
    if target.endswith("load_hub"):
        require(bool(model.name), "model.name", "must be a hub id or a local folder, got ''")
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        from .models import hub_model_available

        if offline and not hub_model_available(model.name, model.loader.get("revision")):
            raise ConfigError(
                f"model.name={model.name!r}: not a local folder and not in the Hugging Face cache, "
                "and HF_HUB_OFFLINE is set (download it first, or point model.name at a folder)"
            )


def validate_fit(model: ModelSchema, objective: ObjectiveConfig) -> None:
    """The objective is made for the model's kind."""
    if objective.model_kind != model.kind:
        fits = [c.name for c in OBJECTIVE_CONFIGS if c.model_kind == model.kind]
        raise ConfigError(
            f"objective.name={objective.name!r} does not fit model.kind={str(model.kind.value)!r} "
            f"(use one of {fits}, e.g. objective={fits[0]})"
        )


def validate_train(train: TrainSchema, adapter: AdapterConfig, objective: ObjectiveConfig) -> None:
    bounded("train.lr", train.lr, 0, lo_open=True)
    bounded("train.weight_decay", train.weight_decay, 0)
    bounded("train.batch_size", train.batch_size, 1)
    bounded("train.epochs", train.epochs, 1)
    bounded("train.max_steps", train.max_steps, 1)
    bounded("train.warmup_ratio", train.warmup_ratio, 0, 0.999)
    bounded("train.min_lr_ratio", train.min_lr_ratio, 0, 1)
    bounded("train.grad_clip", train.grad_clip, 0, lo_open=True)
    bounded("train.patience", train.patience, 1)
    bounded("train.min_delta", train.min_delta, 0)
    bounded("train.log_every", train.log_every, 0)
    resume, init = train.resume_from, train.init_from
    if resume is not None and init is not None:
        raise ConfigError(
            "train.resume_from and train.init_from are exclusive: resume continues a run, init_from forks one"
        )
    if resume is not None and isinstance(objective, HealConfig):
        raise ConfigError(
            "train.resume_from is not supported with objective=heal (rounds); fork a round with train.init_from"
        )
    for key, value in (("train.resume_from", resume), ("train.init_from", init)):
        if value is None:
            continue
        path = Path(value)
        if not path.exists():
            raise ConfigError(f"{key}={value!r}: no such file or folder")
        adapter_file = path / "adapter.safetensors" if path.is_dir() else path
        try:
            kind = read_metadata(adapter_file).get("kind", "lora")
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{key}={value!r}: not a training state or adapter file ({err})"
            ) from None
        if kind != adapter.kind:
            raise ConfigError(
                f"{key}={value!r} holds a {kind} adapter but adapter.kind={adapter.kind!r}"
            )


def validate_eval(e: EvalSchema) -> None:
    grid = e.c_grid
    require(len(grid) > 0, "eval.c_grid", f"must be a non-empty list of numbers, got {grid!r}")
    for value in grid:
        bounded("eval.c_grid", value)
    require(
        0 in grid,
        "eval.c_grid",
        f"must contain 0 (the base model every metric is relative to), got {grid!r}",
    )
    require(len(set(grid)) == len(grid), "eval.c_grid", f"has repeated values: {grid!r}")
    bounded("eval.batch_size", e.batch_size, 1)
    bounded("eval.probe_l2", e.probe_l2, 0)
    bounded("eval.probe_steps", e.probe_steps, 1)
    for key, search in (("eval.calibration", e.calibration), ("eval.frontier", e.frontier)):
        bounded(f"{key}.rel_tol", search.rel_tol, 0, 0.5, lo_open=True)
        bounded(f"{key}.max_c", search.max_c, 1)
        bounded(f"{key}.max_evals", search.max_evals, 4)
    bounded("eval.gates.min_cosine", e.gates.min_cosine, -1, 1)
    bounded("eval.gates.max_nll_increase", e.gates.max_nll_increase, 0)
    bounded("eval.gates.max_kl", e.gates.max_kl, 0)
    _levels("eval.frontier.cosine", e.frontier.cosine, -1, 1, descending=True)
    _levels("eval.frontier.kl", e.frontier.kl, 0, None, descending=False)
    methods = [str(m.value) for m in e.baselines.methods]
    require(
        len(set(methods)) == len(methods),
        "eval.baselines.methods",
        f"has repeated names: {methods!r}",
    )
    bounded("eval.baselines.mid_block", e.baselines.mid_block, 0, 1)
    bounded("eval.bootstrap.n", e.bootstrap.n, 10)
    bounded("eval.bootstrap.seed", e.bootstrap.seed, 0)


def _levels(key: str, values: list[float], lo, hi, descending: bool) -> None:
    """A non-empty list of distinct numbers in (lo, hi), ordered away from the c = 0 value."""
    require(len(values) > 0, key, f"must be a non-empty list of numbers, got {values!r}")
    for v in values:
        bounded(key, v)
        require(
            lo < v and (hi is None or v < hi),
            key,
            f"values must lie in ({lo}, {hi}), got {values!r}",
        )
    order = "descending" if descending else "ascending"
    require(
        values == sorted(set(values), reverse=descending),
        key,
        f"must be distinct and {order} (away from c = 0), got {values!r}",
    )


def validate_data(cfg, raw: dict) -> DataBundle:
    kind = raw.get("kind")
    require(kind in DATA_SCHEMAS, "data.kind", f"must be one of {list(DATA_SCHEMAS)}, got {kind!r}")
    data = _typed(DATA_SCHEMAS[kind], raw, "data")
    bounded("data.val_fraction", data.val_fraction, 0, 0.9, lo_open=True)
    if kind == "sentiment":
        bounded("data.n_train", data.n_train, 2, 1368)
    else:
        bounded("data.heldout_fraction", data.heldout_fraction, 0, 0.9, lo_open=True)
        if data.max_pairs is not None:
            bounded("data.max_pairs", data.max_pairs, 2)
    try:
        return load_data(cfg.data)
    except DataError as err:
        raise ConfigError(str(err)) from None


def validate(cfg) -> DataBundle:
    """Check every knob of a ``train`` config; return the data it names.

    Raises:
        ConfigError: the first bad value, its key first in the message.
    """
    raw = _resolved(cfg)
    for group in ("model", "adapter", "objective", "data", "train", "eval"):
        if group not in raw:
            raise ConfigError(f"{group}: missing from the config")
    run = _typed(RunSchema, {k: raw.get(k) for k in RunSchema.__dataclass_fields__}, "")
    bounded("seed", run.seed, 0)
    if run.threads is not None:
        bounded("threads", run.threads, 1)
    validate_device(run.device)
    model = _typed(ModelSchema, raw["model"], "model")
    validate_model(model)
    adapter = _record(raw["adapter"], "adapter", AdapterConfig)
    objective = _record(raw["objective"], "objective", ObjectiveConfig)
    validate_fit(model, objective)
    adapter.validate("adapter")
    objective.validate("objective")
    validate_train(_typed(TrainSchema, raw["train"], "train"), adapter, objective)
    validate_eval(_typed(EvalSchema, raw["eval"], "eval"))
    return validate_data(cfg, raw["data"])
