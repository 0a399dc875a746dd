"""Evaluation: the adapter's ``c`` grid, the calibration, and the frontier of every method.

Encoders: the probe's trait score on the neutral held-out sentences (P(positive), the probe-logit
shift from ``c = 0``, the per-sentence flip rate), cosine to the ``c = 0`` embedding, and the
same on opinionated held-out sentences at the frontier points. Causal LMs: the held-out
chosen-vs-rejected margin (its shift and flip rate), NLL and KL to ``c = 0``. The adapter and the
steering-vector baselines (:mod:`experiments.steering`) are compared along the trait-vs-coherence
frontier (:mod:`experiments.frontier`), every entry with a bootstrap 95% interval. The grid's
Spearman ρ and retrieval@1 stay in the JSON; they saturate (a random direction scores 1.0 on
both) and are not evidence.

The command-line form rebuilds model and data from the config stored in the adapter's metadata,
reloads the adapter with :func:`modlora.load_adapter`, re-runs the evaluation in its own Hydra
folder and reports the largest difference from the metrics logged at training time.
"""

import math
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import OmegaConf

import modlora as ml

from .build import build_meters, build_methods, load_model, set_threads
from .calibrate import calibrate
from .datasets import load_data
from .frontier import frontier
from .metrics import row_of, spearman
from .paths import CONF_DIR
from .plots import plot
from .report import format_frontier, format_table, write_json
from .stats import bootstrap


def sweep(meter, adapter, c_grid, n_boot: int = 1000, seed: int = 0) -> dict:
    """Measure every ``c`` of the grid: ``{"rows", "rows_ci", "trait", "coherence", "spearman"}``
    (``rows_ci[i]``: the bootstrap intervals of ``rows[i]``)."""
    stats = [(float(c), meter.stats(adapter, float(c))) for c in sorted(c_grid)]
    rows = [row_of(c, s) for c, s in stats]
    trait = meter.trait
    rho = spearman([r["c"] for r in rows], [r[trait] for r in rows])
    return {
        "trait": trait,
        "coherence": list(meter.coherence),
        "rows": rows,
        "rows_ci": [bootstrap(s, n_boot, seed) for _, s in stats],
        "spearman": rho,
    }


def _at(meters: dict, method, c: float, n_boot: int, seed: int) -> dict:
    """Every meter's row (with intervals) at ``c``, except the calibration split's."""
    out = {}
    for name in ("test", "opinionated"):
        if name in meters:
            stats = meters[name].stats(method, c)
            out[name] = {**row_of(c, stats), "ci": bootstrap(stats, n_boot, seed)}
    return out


def evaluate(meters: dict, methods: dict, cfg_eval, seed: int) -> dict:
    """Grid sweep of the adapter, calibration on ``val``, frontier of every method.

    Args:
        meters: from :func:`experiments.build.build_meters`.
        methods: ``{"adapter": adapter, baseline name: steering vector, ...}``.
        cfg_eval: the ``eval`` config.
        seed: the bootstrap seed.
    """
    adapter, test = methods["adapter"], meters["test"]
    n_boot = cfg_eval.bootstrap.n
    result = sweep(test, adapter, cfg_eval.c_grid, n_boot, seed)
    result["probe_accuracy"] = meters.get("probe_accuracy")
    if cfg_eval.calibrate:
        k = cfg_eval.calibration
        cal = calibrate(meters["val"], adapter, cfg_eval.gates, k.rel_tol, k.max_c, k.max_evals)
        cal["at_c"] = {
            sign: _at(meters, adapter, s * cal["c"], n_boot, seed)
            for sign, s in (("+", 1.0), ("-", -1.0))
        }
        result["calibration"] = cal
    else:
        result["calibration"] = {"c": None, "calibrated": False, "split": None, "trace": []}
    f = cfg_eval.frontier
    levels = list(f.cosine if test.frontier_key == "cosine" else f.kl)
    extra = {"opinionated": meters["opinionated"]} if "opinionated" in meters else None
    result["frontier"], result["curves"] = {}, {}
    for name, method in methods.items():
        start = time.time()
        result["frontier"][name], result["curves"][name] = frontier(
            test, method, levels, f.rel_tol, f.max_c, f.max_evals, extra, n_boot, seed
        )
        logger.info("frontier of {}: {:.1f}s", name, time.time() - start)
    result["frontier_key"], result["frontier_levels"] = test.frontier_key, levels
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
    threads: int | None = None,
) -> dict:
    """Rebuild the run stored in ``adapter_path`` and evaluate it again (without calibrating).

    ``threads=None`` uses the training run's torch thread count (stored in its config), so the
    fp32 sums match the logged ones.

    Returns:
        The new evaluation plus ``max_abs_diff`` to the logged rows (when the grid is the same).
    """
    meta = ml.read_metadata(adapter_path)
    extra = meta.get("extra_meta") or {}
    if "config" not in extra:
        raise ValueError(
            f"checkpoint={adapter_path!r}: no experiment config in its metadata (not written by experiments.train)"
        )
    cfg = OmegaConf.create(extra["config"])
    cfg.device = device
    if eval_overrides:
        cfg.eval = OmegaConf.merge(cfg.eval, eval_overrides)
    cfg.eval.calibrate = False  # the deployed c is read from the file
    before = torch.get_num_threads()
    try:
        # the training run's thread count: fp32 sums (and the probe fit on them) then match
        set_threads(threads if threads is not None else cfg.get("threads"))
        return _reevaluate(cfg, extra, adapter_path, out_dir, make_plot)
    finally:
        torch.set_num_threads(before)


def _reevaluate(cfg, extra: dict, adapter_path: str, out_dir, make_plot: bool) -> dict:
    data = load_data(cfg.data)
    model, tokenizer = load_model(cfg)
    adapter = ml.load_adapter(model, adapter_path, attach=False)
    meters = build_meters(cfg, model, tokenizer, data)
    methods = build_methods(cfg, model, tokenizer, data, adapter)
    result = evaluate(meters, methods, cfg.eval, cfg.seed)
    logged = (extra.get("metrics") or {}).get("rows")
    if logged is not None and [r["c"] for r in logged] == [r["c"] for r in result["rows"]]:
        result["max_abs_diff"] = max_difference(result["rows"], logged)
    result["deployed_c"] = adapter.deployed_c
    result.update(adapter=cfg.adapter.kind, r=cfg.adapter.r)
    result["baselines"] = {k: m.describe() for k, m in methods.items() if k != "adapter"}
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", result)
        if make_plot:
            title = f"{cfg.model.name} {cfg.adapter.kind} (re-evaluated)"
            plot(Path(out_dir) / "plot.png", result, title, adapter.deployed_c, result)
    return result


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sink = logger.add(out_dir / "evaluate.log", level="INFO")
    try:
        if not Path(cfg.checkpoint).is_file():
            raise SystemExit(f"checkpoint={cfg.checkpoint!r}: no such file")
        start = time.time()
        overrides = OmegaConf.to_container(cfg.eval) if cfg.eval is not None else None
        result = reevaluate(cfg.checkpoint, cfg.device, overrides, out_dir, cfg.plot, cfg.threads)
        columns = [result["trait"], *result["coherence"]]
        table = format_table(result["rows"], columns, result["rows_ci"])
        print(table)
        print(format_frontier(result))
        if "max_abs_diff" in result:
            print(f"largest difference from the logged metrics: {result['max_abs_diff']:.2e}")
        logger.info("evaluated {} in {:.1f}s\n{}", cfg.checkpoint, time.time() - start, table)
        return result.get("max_abs_diff")
    finally:
        logger.remove(sink)


if __name__ == "__main__":
    sys.exit(main())
