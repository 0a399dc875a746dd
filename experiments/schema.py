"""The types of the ``train`` config's groups that are not instantiated (model, data, train, eval)
and of its top-level keys. :func:`experiments.config.validate` merges the composed config into
them, so a value of the wrong type fails at start-up naming its key; the adapter and objective
groups are typed by the records their ``_target_`` names (:mod:`experiments.adapters`,
:mod:`experiments.objective_config`).
"""

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .steering import KINDS, PLACES

ModelKind = Enum("ModelKind", {k: k for k in ("encoder", "causal")}, type=str)
BaselineMethod = Enum(
    "BaselineMethod", {f"{k}_{p}": f"{k}_{p}" for k in KINDS for p in PLACES}, type=str
)


@dataclass
class RunSchema:
    """The top-level keys of ``conf/train.yaml``."""

    seed: int
    device: str
    threads: int | None
    save_adapter: bool
    plot: bool


@dataclass
class ModelSchema:
    """``conf/model/*.yaml``; ``loader``: ``hydra.utils.instantiate(loader) -> (model, tokenizer)``."""

    name: str
    kind: ModelKind
    max_length: int
    loader: dict[str, Any]
    smoke_test: bool = False


@dataclass
class SentimentDataSchema:
    """``conf/data/sentiment.yaml`` (``kind: sentiment``)."""

    kind: str
    n_train: int
    val_fraction: float
    seed: int


@dataclass
class JsonlDataSchema:
    """``conf/data/persona.yaml`` (``kind: jsonl``)."""

    kind: str
    path: str | None
    heldout_path: str | None
    heldout_fraction: float
    val_fraction: float
    max_pairs: int | None
    seed: int


DATA_SCHEMAS = {"sentiment": SentimentDataSchema, "jsonl": JsonlDataSchema}


@dataclass
class TrainSchema:
    """``conf/train/*.yaml``."""

    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    max_steps: int
    warmup_ratio: float
    min_lr_ratio: float
    grad_clip: float
    patience: int
    min_delta: float
    log_every: int
    progress: bool
    save_state: bool
    resume_from: str | None
    init_from: str | None


@dataclass
class SearchSchema:
    """``eval.calibration``: a bisection on ``c``."""

    rel_tol: float
    max_c: float
    max_evals: int


@dataclass
class GatesSchema:
    min_cosine: float
    max_nll_increase: float
    max_kl: float


@dataclass
class FrontierSchema:
    cosine: list[float]
    kl: list[float]
    rel_tol: float
    max_c: float
    max_evals: int


@dataclass
class BaselinesSchema:
    methods: list[BaselineMethod]
    mid_block: float


@dataclass
class BootstrapSchema:
    n: int
    seed: int


@dataclass
class EvalSchema:
    """``conf/eval/default.yaml``."""

    c_grid: list[float]
    batch_size: int
    probe_l2: float
    probe_steps: int
    calibrate: bool
    calibration: SearchSchema
    gates: GatesSchema
    frontier: FrontierSchema
    baselines: BaselinesSchema
    bootstrap: BootstrapSchema
