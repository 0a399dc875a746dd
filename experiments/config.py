"""Start-up checks of a composed config: every bad value fails here, naming its key.

:func:`validate` runs before any model is loaded or any data is tokenised, so a typo costs a
second, not a training run. It reads the data files (cheap) so an empty file or a malformed
JSONL line is caught too, and returns the loaded :class:`~experiments.datasets.DataBundle`.
"""

import math
import os
from numbers import Real
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig

from modlora import read_metadata

from .datasets import DataBundle, DataError, load_data
from .steering import KINDS as BASELINE_KINDS
from .steering import PLACES as BASELINE_PLACES

MODEL_KINDS = ("encoder", "causal")
OBJECTIVES = {"encoder": ("encoder",), "causal": ("bidirectional", "heal")}
ADAPTERS = ("lora", "pissa")
SELECTION_SCORES = ("s_only", "act_only", "wanda", "cho_rej_min_std")


class ConfigError(ValueError):
    """A config value is unusable; the message starts with its key."""


def _get(cfg, key: str):  # cfg: a DictConfig
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            raise ConfigError(f"{key}: missing from the config")
        node = node[part]
    return node


def _number(
    cfg, key: str, lo: Real | None = None, hi: Real | None = None, lo_open=False, integer=False
):
    value = _get(cfg, key)
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or (integer and not isinstance(value, int))
    ):
        raise ConfigError(f"{key} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} must be <= {hi}, got {value!r}")
    return value


def _choice(cfg, key: str, choices) -> str:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
    return value


def _layer_range(cfg, key: str) -> None:
    value = _get(cfg, key)
    if value is None:
        return
    if not isinstance(value, ListConfig | list | tuple) or len(value) != 2:
        raise ConfigError(f"{key} must be null or [lo, hi], got {value!r}")
    lo, hi = value
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in (lo, hi)):
        raise ConfigError(f"{key} must hold two numbers, got {list(value)!r}")
    if isinstance(lo, float) or isinstance(hi, float):
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"{key} as fractions needs 0 <= lo < hi <= 1, got {list(value)!r}")
    elif not 0 <= lo < hi:
        raise ConfigError(f"{key} as block indices needs 0 <= lo < hi, got {list(value)!r}")


def validate_device(cfg) -> None:
    import torch

    value = _get(cfg, "device")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={value!r}: not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={value!r}: no CUDA device on this machine (use device=cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={value!r}: MPS is not available on this machine")


def validate_model(cfg) -> None:
    kind = _choice(cfg, "model.kind", MODEL_KINDS)
    target = _get(cfg, "model.loader._target_")
    try:
        get_method(target)
    except Exception as err:
        raise ConfigError(
            f"model.loader._target_={target!r}: unknown model loader ({err})"
        ) from None
    _number(cfg, "model.max_length", 1, integer=True)
    if target.endswith("load_hub"):
        name = _get(cfg, "model.name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model.name must be a hub id or a local folder, got {name!r}")
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        from .models import hub_model_available

        if offline and not hub_model_available(name, cfg.model.loader.get("revision")):
            raise ConfigError(
                f"model.name={name!r}: not a local folder and not in the Hugging Face cache, "
                "and HF_HUB_OFFLINE is set (download it first, or point model.name at a folder)"
            )
    objective = _get(cfg, "objective.name")
    if objective not in OBJECTIVES[kind]:
        raise ConfigError(
            f"objective.name={objective!r} does not fit model.kind={kind!r} "
            f"(use one of {list(OBJECTIVES[kind])}, e.g. objective={OBJECTIVES[kind][0]})"
        )


def validate_adapter(cfg) -> None:
    kind = _choice(cfg, "adapter.kind", ADAPTERS)
    _number(cfg, "adapter.lr", 0, lo_open=True)
    _number(cfg, "adapter.r", 1, integer=True)
    _layer_range(cfg, "adapter.layer_range")
    for key in ("adapter.targets", "adapter.exclude"):
        value = _get(cfg, key)
        if isinstance(value, str):
            continue
        if not isinstance(value, ListConfig) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    if len(_get(cfg, "adapter.targets")) == 0:
        raise ConfigError("adapter.targets must name at least one pattern")
    if kind == "lora":
        _number(cfg, "adapter.alpha", 0, lo_open=True)
        _number(cfg, "adapter.dropout", 0, 0.999)
        _choice(cfg, "adapter.init", ("zero", "signed"))
    else:
        _choice(cfg, "adapter.selection_score", SELECTION_SCORES)
        _number(cfg, "adapter.delta_s_init")


def validate_objective(cfg) -> None:
    name = _get(cfg, "objective.name")
    _number(cfg, "objective.train_c", 0, lo_open=True)
    if name == "encoder":
        _number(cfg, "objective.shift", 0, lo_open=True)
        _number(cfg, "objective.barrier", 0)
        _number(cfg, "objective.margin", 0)
    elif name == "bidirectional":
        _number(cfg, "objective.beta", 0)
        if _get(cfg, "objective.top_k") is not None:
            _number(cfg, "objective.top_k", 1, integer=True)
        if not isinstance(_get(cfg, "objective.pcgrad"), bool):
            raise ConfigError(
                f"objective.pcgrad must be true or false, got {cfg.objective.pcgrad!r}"
            )
    elif name == "heal":
        _number(cfg, "objective.lam", 0)
        _number(cfg, "objective.tau", 0)
        _choice(cfg, "objective.aggregate", ("mean", "rmse", "p95", "max"))
        _choice(cfg, "objective.anchor", ("base", "prev"))
        _number(cfg, "objective.rounds", 1, integer=True)
        if _get(cfg, "objective.top_k") is not None:
            _number(cfg, "objective.top_k", 1, integer=True)
    else:
        raise ConfigError(
            f"objective.name must be one of encoder, bidirectional, heal; got {name!r}"
        )


def validate_train(cfg) -> None:
    _number(cfg, "train.lr", 0, lo_open=True)
    _number(cfg, "train.weight_decay", 0)
    _number(cfg, "train.batch_size", 1, integer=True)
    _number(cfg, "train.epochs", 1, integer=True)
    _number(cfg, "train.max_steps", 1, integer=True)
    _number(cfg, "train.warmup_ratio", 0, 0.999)
    _number(cfg, "train.min_lr_ratio", 0, 1)
    _number(cfg, "train.grad_clip", 0, lo_open=True)
    _number(cfg, "train.patience", 1, integer=True)
    _number(cfg, "train.min_delta", 0)
    _number(cfg, "train.log_every", 0, integer=True)
    resume, init = _get(cfg, "train.resume_from"), _get(cfg, "train.init_from")
    if resume is not None and init is not None:
        raise ConfigError(
            "train.resume_from and train.init_from are exclusive: resume continues a run, init_from forks one"
        )
    if resume is not None and _get(cfg, "objective.name") == "heal":
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
        if kind != _get(cfg, "adapter.kind"):
            raise ConfigError(
                f"{key}={value!r} holds a {kind} adapter but adapter.kind={cfg.adapter.kind!r}"
            )


def validate_eval(cfg) -> None:
    grid = _get(cfg, "eval.c_grid")
    if not isinstance(grid, ListConfig) or len(grid) == 0:
        raise ConfigError(f"eval.c_grid must be a non-empty list of numbers, got {grid!r}")
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(f"eval.c_grid must hold finite numbers, got {list(grid)!r}")
    if 0 not in list(grid):
        raise ConfigError(
            f"eval.c_grid must contain 0 (the base model every metric is relative to), got {list(grid)!r}"
        )
    if len(set(grid)) != len(grid):
        raise ConfigError(f"eval.c_grid has repeated values: {list(grid)!r}")
    _number(cfg, "eval.batch_size", 1, integer=True)
    _number(cfg, "eval.probe_l2", 0)
    _number(cfg, "eval.probe_steps", 1, integer=True)
    _number(cfg, "eval.calibration.rel_tol", 0, 0.5, lo_open=True)
    _number(cfg, "eval.calibration.max_c", 1)
    _number(cfg, "eval.calibration.max_evals", 4, integer=True)
    _number(cfg, "eval.gates.min_cosine", -1, 1)
    _number(cfg, "eval.gates.max_nll_increase", 0)
    _number(cfg, "eval.gates.max_kl", 0)
    _levels(cfg, "eval.frontier.cosine", -1, 1, descending=True)
    _levels(cfg, "eval.frontier.kl", 0, None, descending=False)
    _number(cfg, "eval.frontier.rel_tol", 0, 0.5, lo_open=True)
    _number(cfg, "eval.frontier.max_c", 1)
    _number(cfg, "eval.frontier.max_evals", 4, integer=True)
    methods = _get(cfg, "eval.baselines.methods")
    names = [f"{k}_{p}" for k in BASELINE_KINDS for p in BASELINE_PLACES]
    if not isinstance(methods, ListConfig) or any(m not in names for m in methods):
        raise ConfigError(f"eval.baselines.methods must be a list of {names}, got {methods!r}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"eval.baselines.methods has repeated names: {list(methods)!r}")
    _number(cfg, "eval.baselines.mid_block", 0, 1)
    _number(cfg, "eval.bootstrap.n", 10, integer=True)
    _number(cfg, "eval.bootstrap.seed", 0, integer=True)


def _levels(cfg, key: str, lo, hi, descending: bool) -> None:
    """A non-empty list of distinct numbers in (lo, hi), ordered away from the c = 0 value."""
    value = _get(cfg, key)
    if not isinstance(value, ListConfig) or len(value) == 0:
        raise ConfigError(f"{key} must be a non-empty list of numbers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ConfigError(f"{key} must hold finite numbers, got {list(value)!r}")
        if v <= lo or (hi is not None and v >= hi):
            raise ConfigError(f"{key} values must lie in ({lo}, {hi}), got {list(value)!r}")
    if list(value) != sorted(set(value), reverse=descending):
        order = "descending" if descending else "ascending"
        raise ConfigError(
            f"{key} must be distinct and {order} (away from c = 0), got {list(value)!r}"
        )


def validate_data(cfg) -> DataBundle:
    kind = _choice(cfg, "data.kind", ("sentiment", "jsonl"))
    _number(cfg, "data.val_fraction", 0, 0.9, lo_open=True)
    if kind == "sentiment":
        _number(cfg, "data.n_train", 2, 1368, integer=True)
    else:
        _number(cfg, "data.heldout_fraction", 0, 0.9, lo_open=True)
        if _get(cfg, "data.max_pairs") is not None:
            _number(cfg, "data.max_pairs", 2, integer=True)
    try:
        return load_data(cfg.data)
    except DataError as err:
        raise ConfigError(str(err)) from None


def validate(cfg) -> DataBundle:
    """Check every knob of a ``train`` config; return the data it names.

    Raises:
        ConfigError: the first bad value, its key first in the message.
    """
    _number(cfg, "seed", 0, integer=True)
    if _get(cfg, "threads") is not None:
        _number(cfg, "threads", 1, integer=True)
    validate_device(cfg)
    validate_model(cfg)
    validate_adapter(cfg)
    validate_objective(cfg)
    validate_train(cfg)
    validate_eval(cfg)
    return validate_data(cfg)
