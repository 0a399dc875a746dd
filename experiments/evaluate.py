"""Evaluation over the ``c`` grid, and ``python -m experiments.evaluate adapter=PATH``.

Encoders: the probe's trait score P(positive) on neutral held-out sentences, cosine to the
``c = 0`` embedding and paraphrase retrieval at every ``c``. Causal LMs: the held-out
chosen-vs-rejected log-prob margin, completion NLL and KL to ``c = 0``. Spearman's ρ of the trait
score over the grid says whether it moves monotonically with ``c``.

The command-line form rebuilds model and data from the config stored in the adapter's metadata,
reloads the adapter with :func:`modlora.load_adapter`, re-runs the evaluation in its own Hydra
folder and reports the largest difference from the metrics logged at training time.
"""

import math
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import OmegaConf

import modlora as ml

from .build import build_meter, load_model, set_threads
from .calibrate import c_scan
from .datasets import load_data
from .metrics import spearman
from .report import format_table, plot, write_json

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# The evaluation app has its own config folder: there ``adapter=PATH`` is a plain key, not the
# training app's ``adapter`` config group.
EVAL_CONF_DIR = str(Path(CONF_DIR) / "evaluate")


def sweep(meter, adapter, c_grid) -> dict:
    """Measure every ``c`` of the grid; ``{"rows", "trait", "spearman"}``."""
    rows = [meter(adapter, float(c)) for c in sorted(c_grid)]
    trait = meter.trait
    rho = spearman([r["c"] for r in rows], [r[trait] for r in rows])
    return {"trait": trait, "coherence": list(meter.coherence), "rows": rows, "spearman": rho}


def evaluate(meter, adapter, cfg_eval) -> dict:
    """The grid sweep plus (when ``eval.calibrate``) the ``c_scan`` calibration."""
    result = sweep(meter, adapter, cfg_eval.c_grid)
    if hasattr(meter, "probe_accuracy"):
        result["probe_accuracy"] = meter.probe_accuracy
    if cfg_eval.calibrate:
        base = next(r for r in result["rows"] if r["c"] == 0)
        s = cfg_eval.c_scan
        result["calibration"] = c_scan(
            meter, adapter, cfg_eval.gates, s.start, s.factor, s.min_c, base
        )
    else:
        result["calibration"] = {"c": None, "calibrated": False, "scan": []}
    return result


def max_difference(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference between two lists of metric rows (same keys and order)."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if isinstance(v, float) and not (math.isnan(v) and math.isnan(rb[k])):
                worst = max(worst, abs(v - rb[k]))
    return worst


def reevaluate(
    adapter_path: str,
    device: str = "cpu",
    eval_overrides: dict | None = None,
    out_dir: Path | None = None,
    make_plot: bool = True,
) -> dict:
    """Rebuild the run stored in ``adapter_path`` and evaluate it again.

    Returns:
        The new evaluation plus ``max_abs_diff`` to the logged rows (when the grid is the same).
    """
    meta = ml.read_metadata(adapter_path)
    extra = meta.get("extra_meta") or {}
    if "config" not in extra:
        raise ValueError(
            f"adapter={adapter_path!r}: no experiment config in its metadata (not written by experiments.train)"
        )
    cfg = OmegaConf.create(extra["config"])
    cfg.device = device
    if eval_overrides:
        cfg.eval = OmegaConf.merge(cfg.eval, eval_overrides)
    data = load_data(cfg.data)
    model, tokenizer = load_model(cfg)
    adapter = ml.load_adapter(model, adapter_path, attach=False)
    meter = build_meter(cfg, model, tokenizer, data)
    result = sweep(meter, adapter, cfg.eval.c_grid)
    logged = (extra.get("metrics") or {}).get("rows")
    if logged is not None and [r["c"] for r in logged] == [r["c"] for r in result["rows"]]:
        result["max_abs_diff"] = max_difference(result["rows"], logged)
    result["deployed_c"] = adapter.deployed_c
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
        if make_plot:
            plot(
                Path(out_dir) / "plot.png",
                result["rows"],
                result["trait"],
                tuple(result["coherence"]),
                f"{cfg.model.name} {cfg.adapter.kind} (re-evaluated)",
                adapter.deployed_c,
            )
    return result


@hydra.main(config_path=EVAL_CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sink = logger.add(out_dir / "evaluate.log", level="INFO")
    try:
        set_threads(cfg.threads)
        if not Path(cfg.adapter).is_file():
            raise SystemExit(f"adapter={cfg.adapter!r}: no such file")
        start = time.time()
        overrides = OmegaConf.to_container(cfg.eval) if cfg.eval is not None else None
        result = reevaluate(cfg.adapter, cfg.device, overrides, out_dir, cfg.plot)
        table = format_table(result["rows"], [result["trait"], *result["coherence"]])
        print(table)
        print(f"Spearman rho of {result['trait']} over c: {result['spearman']:.3f}")
        if "max_abs_diff" in result:
            print(f"largest difference from the logged metrics: {result['max_abs_diff']:.2e}")
        logger.info("evaluated {} in {:.1f}s\n{}", cfg.adapter, time.time() - start, table)
        return result["spearman"]
    finally:
        logger.remove(sink)


if __name__ == "__main__":
    sys.exit(main())
