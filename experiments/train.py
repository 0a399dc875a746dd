"""``python -m experiments.train``: train, calibrate and evaluate one steering adapter.

Writes into the Hydra run folder: ``adapter.safetensors`` (the config, metrics and calibrated
``c`` in its metadata), ``metrics.json``, ``plot.png`` (trait score and coherence against ``c``),
``train.log`` (loguru) and, with ``train.save_state``, ``state/`` to resume from. Prints the
metrics table. Every config value is checked before anything heavy is loaded.

``torchrun --nproc_per_node=N -m experiments.train ...`` (or N SLURM tasks) trains with DDP or
FSDP2 (``distributed.strategy``) on slices of the same global batch (see
:mod:`experiments.parallel`); rank 0 alone evaluates and writes the run folder.
"""

import math
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from loguru import logger

import modlora as ml
from modlora import distributed

from . import parallel
from . import resume as resume_mod
from .build import (
    build_adapter,
    build_meters,
    build_methods,
    build_objective,
    config_dict,
    load_model,
    set_threads,
)
from .config import validate
from .evaluate import evaluate
from .paths import CONF_DIR
from .plots import plot
from .report import format_frontier, format_table, write_json
from .trainer import FitState, fit, make_optimizer, make_scheduler


def _schedule(cfg, objective):
    per_epoch = objective.n_batches("train", cfg.train.batch_size)
    total = min(cfg.train.max_steps, cfg.train.epochs * per_epoch)
    return total, int(cfg.train.warmup_ratio * total)


def train_one(cfg, model, tokenizer, data, run_dir: Path, history=None, fork: bool = True) -> tuple:
    """Build and train one adapter (resuming or forking when the config says so); with several
    processes the model is wrapped (DDP / FSDP2) for the training loop only."""
    if fork and cfg.train.init_from is not None:
        adapter = resume_mod.fork(cfg.train.init_from, model, cfg.adapter.kind)
        logger.info("forked the weights of {} (fresh optimizer and schedule)", cfg.train.init_from)
    else:
        adapter = build_adapter(cfg, model, tokenizer, data)
    objective = build_objective(cfg, model, tokenizer, adapter, data, history)
    total, warmup = _schedule(cfg, objective)
    rank, world = distributed.process_rank(), distributed.process_group_size()
    strategy = cfg.distributed.strategy
    if world > 1:  # before the optimizer: fully_shard replaces the parameters by shards
        parallel.wrap(objective, adapter, model, strategy)
    optimizer = make_optimizer(
        [p for p in adapter.parameters()], cfg.train.lr, cfg.train.weight_decay
    )
    scheduler = make_scheduler(optimizer, warmup, total, cfg.train.min_lr_ratio)
    state, best = None, None
    if cfg.train.resume_from is not None:
        state, best = resume_mod.resume(cfg.train.resume_from, adapter, optimizer, scheduler)
        logger.info("resumed from {} at step {}", cfg.train.resume_from, state.step)
    on_epoch_end = None
    if cfg.train.save_state and rank == 0:  # (under DDP the tensors are whole on rank 0)
        state_dir = run_dir / "state"

        def on_epoch_end(s: FitState, best_weights: dict) -> None:
            resume_mod.save(state_dir, adapter, optimizer, scheduler, s, best_weights)

    state, _ = fit(
        adapter,
        objective,
        optimizer,
        scheduler,
        cfg.train,
        cfg.seed,
        state,
        on_epoch_end,
        best,
        rank=rank,
        world=world,
    )
    if world > 1:
        parallel.unwrap(objective, adapter, model, strategy)
    return adapter, state


def train_heal_rounds(cfg, model, tokenizer, data, run_dir: Path) -> tuple:
    """``objective.rounds`` heal rounds; a round that lowers the validation loss joins the history."""
    kept, kept_ids, history, states, best = [], [], None, [], math.inf
    for k in range(cfg.objective.rounds):
        logger.info("heal round {} (kept so far: {})", k + 1, len(kept))
        adapter, state = train_one(
            cfg, model, tokenizer, data, run_dir / f"round{k + 1}", history, fork=k == 0
        )
        states.append(state)
        if state.best_val < best:
            best = state.best_val
            kept.append((adapter, cfg.objective.train_c))
            kept_ids.append(k + 1)
            if history is not None:
                history.remove()
            history = ml.HistoryBake(model, kept)
            logger.info("round {} kept (val {:.4f})", k + 1, state.best_val)
        else:
            logger.info("round {} dropped (val {:.4f} >= {:.4f})", k + 1, state.best_val, best)
    history.remove()
    result = ml.HistoryBake(model, kept, attach=False)
    merged = FitState(
        step=sum(s.step for s in states),
        best_val=best,
        history=[dict(h, round=i + 1) for i, s in enumerate(states) for h in s.history],
        losses=[x for s in states for x in s.losses],
    )
    return result, merged, kept_ids


def _calibration_note(calibration: dict) -> str:
    if calibration["c"] is None:
        return "not calibrated (eval.calibrate=false)"
    note = "" if calibration["calibrated"] else " (no |c| passed the gates)"
    if calibration.get("at_max"):
        note += " (the gates still pass at eval.calibration.max_c)"
    return f"calibrated c = {calibration['c']:.3f} on the {calibration['split']} split{note}"


def _train_summary(state: FitState) -> dict:
    return {
        "steps": state.step,
        "first_loss": state.losses[0] if state.losses else None,
        "last_loss": state.losses[-1] if state.losses else None,
        "best_val": state.best_val,
        "stopped_early": state.stopped_early,
        "epochs": state.history,
        "losses": state.losses,
    }


def run(cfg, run_dir: Path) -> dict:
    """Everything ``python -m experiments.train`` does, into ``run_dir``; returns the metrics
    (on ranks other than 0 of a multi-process run: only the ``train`` section)."""
    start = time.time()
    data = validate(cfg)  # every bad value fails here, before anything heavy
    info = parallel.start()  # one process: nothing started
    parallel.check(cfg, info.world_size)
    parallel.pick_device(cfg, info)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        set_threads(cfg.threads)
        return _run(cfg, run_dir, data, start)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, notebooks) keep their setting


def _run(cfg, run_dir: Path, data, start: float) -> dict:
    torch.manual_seed(cfg.seed)
    logger.info("run folder {}", run_dir)
    logger.info(
        "model={} adapter={} r={} objective={} data={} ({} train / {} val / {} held-out pairs)",
        cfg.model.name,
        cfg.adapter.kind,
        cfg.adapter.r,
        cfg.objective.name,
        cfg.data.kind,
        len(data.train),
        len(data.val),
        len(data.heldout),
    )
    world = distributed.process_group_size()
    parallel.log_batches(cfg, world, cfg.distributed.strategy)
    model, tokenizer = load_model(cfg)
    t_loaded = time.time()
    if cfg.objective.name == "heal":
        adapter, state, kept_rounds = train_heal_rounds(cfg, model, tokenizer, data, run_dir)
    else:
        (adapter, state), kept_rounds = train_one(cfg, model, tokenizer, data, run_dir), None
    if world > 1 and cfg.distributed.strategy == "fsdp2":
        # the trained shards, gathered into one file by every rank; rank 0 evaluates them on
        # a freshly loaded whole model (the file is rewritten below with the metrics)
        path = adapter.save(run_dir / "adapter.safetensors")
        if distributed.is_main_process():
            model, tokenizer = load_model(cfg)
            adapter = ml.load_adapter(model, path)
    if not distributed.is_main_process():
        return {"train": _train_summary(state)}  # rank 0 evaluates and writes alone
    t_trained = time.time()
    meters = build_meters(cfg, model, tokenizer, data)
    methods = build_methods(cfg, model, tokenizer, data, adapter)
    result = evaluate(meters, methods, cfg.eval, cfg.seed)
    t_evaluated = time.time()
    c_star = result["calibration"]["c"]
    metrics = {
        "model": cfg.model.name,
        "smoke_test": bool(cfg.model.get("smoke_test", False)),
        "adapter": cfg.adapter.kind,
        "r": cfg.adapter.r,
        "objective": cfg.objective.name,
        "seed": cfg.seed,
        "trait": result["trait"],
        "frontier_key": result["frontier_key"],
        "frontier_levels": result["frontier_levels"],
        "frontier": result["frontier"],
        "baselines": {k: m.describe() for k, m in methods.items() if k != "adapter"},
        "calibrated_c": c_star,
        "calibrated": result["calibration"]["calibrated"],
        "calibration_split": result["calibration"]["split"],
        "calibration": result["calibration"],
        "rows": result["rows"],
        "rows_ci": result["rows_ci"],
        "spearman": result["spearman"],  # not evidence: saturates even for a random direction
        "curves": result["curves"],
        "probe_accuracy": result.get("probe_accuracy"),
        "n_items": {k: len(m) for k, m in meters.items() if hasattr(m, "__len__")},
        "kept_rounds": kept_rounds,
        "train": _train_summary(state),
        "seconds": {
            "load": t_loaded - start,
            "train": t_trained - t_loaded,
            "eval": t_evaluated - t_trained,
        },
    }
    if cfg.save_adapter:
        small = {
            k: metrics[k]
            for k in (
                "trait",
                "calibrated_c",
                "calibrated",
                "calibration_split",
                "rows",
                "frontier",
                "probe_accuracy",
            )
        }
        small["train"] = {
            k: metrics["train"][k] for k in ("steps", "first_loss", "last_loss", "best_val")
        }
        adapter.save(
            run_dir / "adapter.safetensors",
            extra_meta={"config": config_dict(cfg), "metrics": small},
            c=c_star,
        )
    columns = [result["trait"], *result["coherence"]]
    table = format_table(result["rows"], columns, result["rows_ci"])
    front = format_frontier(metrics)
    if cfg.plot:
        title = f"{cfg.model.name} · {cfg.adapter.kind} r={cfg.adapter.r} · {cfg.objective.name}"
        if metrics["smoke_test"]:
            title += " · SMOKE TEST (random weights)"
        plot(run_dir / "plot.png", result, title, c_star, metrics)
    metrics["seconds"]["total"] = time.time() - start
    metrics["config"] = config_dict(cfg)
    write_json(run_dir / "metrics.json", metrics)
    summary = (
        f"{table}\n\n{front}\n{_calibration_note(result['calibration'])}; "
        f"{state.step} steps; {metrics['seconds']['total']:.1f}s "
        f"(load {metrics['seconds']['load']:.1f}, train {metrics['seconds']['train']:.1f}, eval {metrics['seconds']['eval']:.1f})"
    )
    if metrics["smoke_test"]:
        summary += "\nSMOKE TEST: a random tiny model cannot show steering; these numbers test plumbing only."
    print(summary)
    logger.info("results\n{}", summary)
    return metrics


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    started_here = not parallel.running()  # (under torchrun it runs already: see __main__)
    info = parallel.start()  # SLURM tasks: the process group from SLURM's variables; alone: nothing
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        sink = logger.add(run_dir / "train.log", level="INFO", enqueue=False)
    else:  # the other ranks run the same loop: their warnings only
        logger.remove()
        sink = logger.add(sys.stderr, level="WARNING")
    try:
        metrics = run(cfg, run_dir)
    finally:
        logger.remove(sink)
        if started_here:  # a submitit task runs one job; torchrun may run a local sweep's jobs
            parallel.finish()
    return metrics["train"]["best_val"]  # what a Hydra sweeper may minimise: the validation loss


if __name__ == "__main__":
    parallel.freeze_hydra_clock()  # several processes: one ${now:} and so one run folder
    try:
        main()
    finally:
        parallel.finish()
