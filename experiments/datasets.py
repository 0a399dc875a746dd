"""Data for the experiments: contrastive pairs, evaluation sets and the JSONL format.

JSONL (one object per line): ``{"prompt": str, "chosen": str, "rejected": str}``. ``prompt`` may
be empty (encoders embed ``prompt + chosen``); ``chosen`` carries the trait at ``c > 0``,
``rejected`` its opposite. Blank lines are skipped; anything else that is not such an object is
an error naming the file, the line and the config key it came from.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .data import sentiment

DATA_DIR = Path(__file__).parent / "data"
PERSONA_TRAIN = DATA_DIR / "persona_train.jsonl"
PERSONA_HELDOUT = DATA_DIR / "persona_heldout.jsonl"


class DataError(ValueError):
    """A data file or data setting is unusable; the message names the config key."""


@dataclass(frozen=True)
class Pair:
    """One contrastive example: the same prompt with a trait-positive and a trait-negative text."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class DataBundle:
    """Everything a run reads.

    Attributes:
        train: training pairs.
        val: validation pairs (early stopping), split off ``train``.
        heldout: held-out pairs (never trained on).
        probe_texts, probe_labels: labelled sentences for the encoder probe (1 = trait-positive).
        neutral: sentences whose trait score is measured at every ``c`` (encoders).
        paraphrases: one paraphrase per ``neutral`` sentence (retrieval), or ``None``.
        opinionated, opinionated_labels: held-out sentences that carry the trait or its opposite
            (1 = trait-positive), disjoint from the probe's; content preservation and flips on
            them are reported beside the neutral ones (encoders; empty for JSONL data).
    """

    train: list[Pair]
    val: list[Pair]
    heldout: list[Pair]
    probe_texts: list[str] = field(default_factory=list)
    probe_labels: list[int] = field(default_factory=list)
    neutral: list[str] = field(default_factory=list)
    paraphrases: list[str] | None = None
    opinionated: list[str] = field(default_factory=list)
    opinionated_labels: list[int] = field(default_factory=list)


def read_jsonl(path: str | Path, key: str = "data.path") -> list[Pair]:
    """Read and check a JSONL file of ``{"prompt", "chosen", "rejected"}`` objects.

    Args:
        path: the file.
        key: the config key the path came from (named in errors).

    Raises:
        DataError: missing or empty file, invalid JSON, a line that is not an object, a missing
            or non-string field, or an empty ``chosen`` / ``rejected``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: no such file")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{key}={str(path)!r} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for name in ("chosen", "rejected"):
                if not isinstance(row.get(name), str) or not row[name].strip():
                    raise DataError(f"{where}: {name!r} must be a non-empty string")
            prompt = row.get("prompt", "")
            if not isinstance(prompt, str):
                raise DataError(f"{where}: 'prompt' must be a string")
            pairs.append(Pair(prompt, row["chosen"], row["rejected"]))
    if not pairs:
        raise DataError(f"{key}={str(path)!r}: the file holds no examples")
    return pairs


def split_val(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Shuffle deterministically and split off ``fraction`` of ``pairs`` (at least one each)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(pairs)))
    if n_val >= len(pairs):
        raise DataError(
            f"data.val_fraction={fraction} leaves no training pairs out of {len(pairs)}"
        )
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


def load_data(cfg) -> DataBundle:
    """Build the :class:`DataBundle` a ``data`` config names (cheap: no model involved).

    ``data.kind=sentiment`` is the embedded templated set; ``data.kind=jsonl`` reads
    ``data.path`` (``null`` = the embedded persona set) and ``data.heldout_path`` (``null`` =
    the embedded persona held-out set when ``data.path`` is null, else a split of ``data.path``).
    """
    kind = cfg.kind
    if kind == "sentiment":
        # the seed draws the training pairs (and splits off the validation pairs)
        drawn = sentiment.train_pairs(cfg.n_train, seed=cfg.seed)
        pairs = [Pair("", p["chosen"], p["rejected"]) for p in drawn]
        train, val = split_val(pairs, cfg.val_fraction, cfg.seed)
        heldout = [Pair("", p["chosen"], p["rejected"]) for p in sentiment.heldout_pairs()]
        probe_texts, probe_labels = sentiment.probe_sentences()
        # Half of the held-out subjects label the probe too (unseen wording); the other half
        # give the opinionated evaluation sentences, which the probe never sees.
        for p in sentiment.heldout_pairs("probe"):
            probe_texts = [*probe_texts, p["chosen"], p["rejected"]]
            probe_labels = [*probe_labels, 1, 0]
        opinionated, opinionated_labels = [], []
        for p in sentiment.heldout_pairs("opinionated"):
            opinionated += [p["chosen"], p["rejected"]]
            opinionated_labels += [1, 0]
        neutral, paraphrases = sentiment.neutral_paraphrases()
        return DataBundle(
            train,
            val,
            heldout,
            probe_texts,
            probe_labels,
            neutral,
            paraphrases,
            opinionated,
            opinionated_labels,
        )
    if kind != "jsonl":
        raise DataError(f"data.kind must be 'sentiment' or 'jsonl', got {kind!r}")
    path = cfg.path if cfg.path is not None else PERSONA_TRAIN
    pairs = read_jsonl(path, "data.path")
    if cfg.get("max_pairs") is not None:
        pairs = pairs[: cfg.max_pairs]
    heldout_path = cfg.heldout_path
    if heldout_path is None and cfg.path is None:
        heldout_path = PERSONA_HELDOUT
    if heldout_path is not None:
        heldout = read_jsonl(heldout_path, "data.heldout_path")
        train, val = split_val(pairs, cfg.val_fraction, cfg.seed)
    else:
        rest, heldout = split_val(pairs, cfg.heldout_fraction, cfg.seed + 1)
        train, val = split_val(rest, cfg.val_fraction, cfg.seed)
    probe_texts = [p.prompt + p.chosen for p in heldout] + [p.prompt + p.rejected for p in heldout]
    probe_labels = [1] * len(heldout) + [0] * len(heldout)
    neutral = [p.prompt for p in heldout if p.prompt.strip()] or [p.rejected for p in heldout]
    return DataBundle(train, val, heldout, probe_texts, probe_labels, neutral, None)
