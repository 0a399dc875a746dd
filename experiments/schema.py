"""The types of the ``train`` config's groups that are not instantiated (model, data, train, eval)
and of its top-level keys, each with the range checks its types cannot express (``validate``).
:func:`experiments.config.validate` merges the composed config into them, so a value of the wrong
type fails at start-up naming its key; the adapter and objective groups are typed by the records
their ``_target_`` names (:mod:`experiments.adapters`, :mod:`experiments.objective_config`).
"""

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .checks import ConfigError, bounded, require
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

    def validate(self) -> None:
        bounded("seed", self.seed, 0)
        if self.threads is not None:
            bounded("threads", self.threads, 1)


@dataclass
class ModelSchema:
    """``conf/model/*.yaml``; ``loader``: ``hydra.utils.instantiate(loader) -> (model, tokenizer)``."""

    name: str
    kind: ModelKind
    max_length: int
    loader: dict[str, Any]
    smoke_test: bool = False

    def validate(self) -> None:
        bounded("model.max_length", self.max_length, 1)


@dataclass
class SentimentDataSchema:
    """``conf/data/sentiment.yaml`` (``kind: sentiment``)."""

    kind: str
    n_train: int
    val_fraction: float
    seed: int

    def validate(self) -> None:
        bounded("data.val_fraction", self.val_fraction, 0, 0.9, lo_open=True)
        bounded("data.n_train", self.n_train, 2, 1368)


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

    def validate(self) -> None:
        bounded("data.val_fraction", self.val_fraction, 0, 0.9, lo_open=True)
        bounded("data.heldout_fraction", self.heldout_fraction, 0, 0.9, lo_open=True)
        if self.max_pairs is not None:
            bounded("data.max_pairs", self.max_pairs, 2)


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

    def validate(self) -> None:
        bounded("train.lr", self.lr, 0, lo_open=True)
        bounded("train.weight_decay", self.weight_decay, 0)
        bounded("train.batch_size", self.batch_size, 1)
        bounded("train.epochs", self.epochs, 1)
        bounded("train.max_steps", self.max_steps, 1)
        bounded("train.warmup_ratio", self.warmup_ratio, 0, 0.999)
        bounded("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        bounded("train.grad_clip", self.grad_clip, 0, lo_open=True)
        bounded("train.patience", self.patience, 1)
        bounded("train.min_delta", self.min_delta, 0)
        bounded("train.log_every", self.log_every, 0)
        if self.resume_from is not None and self.init_from is not None:
            raise ConfigError(
                "train.resume_from and train.init_from are exclusive: resume continues a run, init_from forks one"
            )


@dataclass
class SearchSchema:
    """``eval.calibration``: a bisection on ``c``."""

    rel_tol: float
    max_c: float
    max_evals: int

    def validate(self, key: str) -> None:
        bounded(f"{key}.rel_tol", self.rel_tol, 0, 0.5, lo_open=True)
        bounded(f"{key}.max_c", self.max_c, 1)
        bounded(f"{key}.max_evals", self.max_evals, 4)


@dataclass
class GatesSchema:
    min_cosine: float
    max_nll_increase: float
    max_kl: float


@dataclass
class FrontierSchema(SearchSchema):
    """``eval.frontier``: the coherence levels, each found by a bisection on ``c``."""

    cosine: list[float]
    kl: list[float]

    def validate(self, key: str) -> None:
        super().validate(key)
        _levels(f"{key}.cosine", self.cosine, -1, 1, descending=True)
        _levels(f"{key}.kl", self.kl, 0, None, descending=False)


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

    def validate(self) -> None:
        grid = self.c_grid
        require(len(grid) > 0, "eval.c_grid", f"must be a non-empty list of numbers, got {grid!r}")
        for value in grid:
            bounded("eval.c_grid", value)
        require(
            0 in grid,
            "eval.c_grid",
            f"must contain 0 (the base model every metric is relative to), got {grid!r}",
        )
        require(len(set(grid)) == len(grid), "eval.c_grid", f"has repeated values: {grid!r}")
        bounded("eval.batch_size", self.batch_size, 1)
        bounded("eval.probe_l2", self.probe_l2, 0)
        bounded("eval.probe_steps", self.probe_steps, 1)
        self.calibration.validate("eval.calibration")
        self.frontier.validate("eval.frontier")
        bounded("eval.gates.min_cosine", self.gates.min_cosine, -1, 1)
        bounded("eval.gates.max_nll_increase", self.gates.max_nll_increase, 0)
        bounded("eval.gates.max_kl", self.gates.max_kl, 0)
        methods = [str(m.value) for m in self.baselines.methods]
        require(
            len(set(methods)) == len(methods),
            "eval.baselines.methods",
            f"has repeated names: {methods!r}",
        )
        bounded("eval.baselines.mid_block", self.baselines.mid_block, 0, 1)
        bounded("eval.bootstrap.n", self.bootstrap.n, 10)
        bounded("eval.bootstrap.seed", self.bootstrap.seed, 0)


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
