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
from .checks import ConfigError, require
from .datasets import DataBundle, DataError, load_data
from .encoder_objective import EncoderConfig
from .objective_config import ObjectiveConfig
from .schema import DATA_SCHEMAS, EvalSchema, ModelSchema, RunSchema, TrainSchema

__all__ = ["ConfigError", "validate"]

OBJECTIVE_CONFIGS = (EncoderConfig, BidirectionalConfig, HealConfig)


def _join(key: str, sub) -> str:
    """``adapter`` + ``r`` -> ``adapter.r``; ``eval.c_grid`` + ``[1]`` -> ``eval.c_grid[1]``."""
    sub = str(sub)
    if not key or not sub:
        return key or sub
    return f"{key}{sub}" if sub.startswith("[") else f"{key}.{sub}"


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
    if not issubclass(cls, base):
        raise ConfigError(f"{key}._target_={target!r} is not a {base.__module__}.{base.__name__}")
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


def validate_loader(model: ModelSchema) -> None:
    """``model.loader._target_`` exists; a hub model is reachable (offline: in the cache)."""
    target = model.loader.get("_target_")
    try:
        get_method(target)
    except Exception as err:
        raise ConfigError(
            f"model.loader._target_={target!r}: unknown model loader ({err})"
        ) from None
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


def validate_files(train: TrainSchema, adapter: AdapterConfig, objective: ObjectiveConfig) -> None:
    """``train.resume_from`` / ``train.init_from`` exist and hold the configured adapter kind."""
    resume, init = train.resume_from, train.init_from
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


def validate_data(cfg, raw: dict) -> DataBundle:
    kind = raw.get("kind")
    require(kind in DATA_SCHEMAS, "data.kind", f"must be one of {list(DATA_SCHEMAS)}, got {kind!r}")
    _typed(DATA_SCHEMAS[kind], raw, "data").validate()
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
    run.validate()
    validate_device(run.device)
    model = _typed(ModelSchema, raw["model"], "model")
    model.validate()
    validate_loader(model)
    adapter = _record(raw["adapter"], "adapter", AdapterConfig)
    objective = _record(raw["objective"], "objective", ObjectiveConfig)
    validate_fit(model, objective)
    adapter.validate("adapter")
    objective.validate("objective")
    train = _typed(TrainSchema, raw["train"], "train")
    train.validate()
    validate_files(train, adapter, objective)
    _typed(EvalSchema, raw["eval"], "eval").validate()
    return validate_data(cfg, raw["data"])
