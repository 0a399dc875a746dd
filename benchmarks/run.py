"""Run every benchmark case in one process and write ``latest.json`` and ``latest.md``.

Usage::

    python -m benchmarks.run            # full run (~10 minutes of CPU on 2 cores)
    python -m benchmarks.run --quick    # smaller shapes, fewer repeats (~1 minute)
    python -m benchmarks.run --only forward,compile --threads 2
    python -m benchmarks.run --update   # a full run that replaces the committed results/latest.*

Results go to a new ``benchmarks/results/runs/<date>_<time>/`` (gitignored) unless ``--update``
(the committed ``benchmarks/results/``, which the README quotes) or ``--out FOLDER``.

``--smoke`` is a seconds-long run on tiny models for the test suite; its numbers mean nothing.
"""

import argparse
import datetime
import time
import warnings
from pathlib import Path

import torch

from . import common, report

RESULTS = Path(__file__).parent / "results"
CASES = (
    "forward",
    "history",
    "per_sample",
    "moe",
    "pissa_svd",
    "calibration",
    "compile",
    "checkpoint",
    "ddp",
)

# Per mode: the shapes and repeats of every case.
SETTINGS = {
    "full": {
        "minilm_batch": 32,
        "llama": {"hidden": 1024, "layers": 4, "heads": 16, "kv_heads": 4, "vocab": 4096},
        "llama_tokens": (4, 128),
        # Timed cases: (entry, model, extra, torch threads or None = --threads,
        # clock or None = --clock, rounds); extra: forward — a (batch, seq) override.
        "forward": (
            ("minilm", "minilm", None, None, None, 21),
            ("llama", "llama", None, None, None, 9),
            ("llama_decode", "llama", (1, 1), None, None, 21),
            ("minilm_2threads", "minilm", None, 2, "wall", 9),
            ("llama_2threads", "llama", None, 2, "wall", 5),
        ),
        "history_rounds": (1, 4, 8),
        "history": (
            ("minilm", "minilm", None, None, None, 6),
            ("llama", "llama", None, None, None, 4),
        ),
        "per_sample": (  # extra: True = forward + backward
            ("minilm", "minilm", False, None, None, 11),
            ("minilm_grad", "minilm", True, None, None, 5),
        ),
        "moe": {"hidden": 256, "layers": 2, "experts": 8, "vocab": 1000},
        "moe_tokens": (4, 64),
        "moe_repeats": 9,
        "svd_shapes": ((2048, 2048), (4096, 1024)),
        "svd_repeats": 3,
        "calibration_tokens": (1_000, 3_000, 10_000, 30_000, 100_000),
        "checkpoint_layers": 32,
        "checkpoint_repeats": 7,
        "ddp_tokens": (2, 128),  # per rank
        "ddp_repeats": 11,
    },
    "quick": {
        "minilm_batch": 32,
        "llama": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 2, "vocab": 2048},
        "llama_tokens": (4, 128),
        "forward": (
            ("minilm", "minilm", None, None, None, 3),
            ("llama", "llama", None, None, None, 3),
            ("minilm_2threads", "minilm", None, 2, "wall", 3),
        ),
        "history_rounds": (1, 4, 8),
        "history": (("minilm", "minilm", None, None, None, 2),),
        "per_sample": (("minilm", "minilm", False, None, None, 2),),
        "moe": {"hidden": 128, "layers": 2, "experts": 4, "vocab": 500},
        "moe_tokens": (2, 32),
        "moe_repeats": 3,
        "svd_shapes": ((1024, 1024), (2048, 512)),
        "svd_repeats": 2,
        "calibration_tokens": (1_000, 10_000),
        "checkpoint_layers": 16,
        "checkpoint_repeats": 3,
        "ddp_tokens": (2, 128),
        "ddp_repeats": 5,
    },
    "smoke": {
        "minilm_batch": 4,
        "llama": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128},
        "llama_tokens": (2, 8),
        "forward": (("llama", "llama", None, None, None, 1),),
        "history_rounds": (1, 2),
        "history": (("llama", "llama", None, None, None, 1),),
        "per_sample": (
            ("llama", "llama", False, None, None, 1),
            ("llama_grad", "llama", True, None, None, 1),
        ),
        "moe": {"hidden": 32, "layers": 1, "experts": 4, "vocab": 128},
        "moe_tokens": (2, 8),
        "moe_repeats": 1,
        "svd_shapes": ((128, 128),),
        "svd_repeats": 1,
        "calibration_tokens": (256, 512),
        "checkpoint_layers": 2,
        "checkpoint_repeats": 1,
        "ddp_tokens": (1, 8),
        "ddp_repeats": 1,
    },
}
CALIBRATION_MODEL = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 4, "vocab": 1000}
COMPILE_MODEL = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128}
CHECKPOINT_MODEL = {"hidden": 256, "heads": 4, "kv_heads": 4, "vocab": 1000}


def _log(msg: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Errors:
    """Collects a failing case's error so the other cases still run; the run exits non-zero."""

    def __init__(self, results: dict) -> None:
        self.results = results

    def __call__(self, where: str):
        return _Guard(self.results, where)


class _Guard:
    def __init__(self, results: dict, where: str) -> None:
        self.results, self.where = results, where

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not isinstance(err, Exception):
            return False
        import traceback

        text = "".join(traceback.format_exception(kind, err, tb))
        _log(f"FAILED {self.where}:\n{text}")
        self.results.setdefault("errors", {})[self.where] = f"{kind.__name__}: {err}"
        return True


def _llama(spec: dict, **extra):
    return common.llama_shaped(
        hidden=spec["hidden"],
        layers=extra.get("layers", spec.get("layers", 2)),
        heads=spec["heads"],
        kv_heads=spec["kv_heads"],
        vocab=spec["vocab"],
    )


def _with_threads(n: int, restore: int, fn, *args, **kwargs):
    torch.set_num_threads(n)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(restore)


def run(mode: str = "full", only=CASES, clock: str = "cpu", threads: int = 1) -> dict:
    """Measure the selected cases; returns the results dict (with ``targets``).

    A case that raises is recorded under ``results["errors"]`` and the others still run.
    """
    from . import (
        calibration_memory,
        checkpoint_io,
        compile_recompiles,
        ddp_step,
        forward,
        moe,
        pissa_svd,
    )

    if mode not in SETTINGS:
        raise ValueError(f"mode must be one of {sorted(SETTINGS)}, got {mode!r}")
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {CASES}")
    cfg = SETTINGS[mode]
    smoke = mode == "smoke"
    torch.set_num_threads(threads)
    start = time.perf_counter()
    results: dict = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": common.machine(),
        "settings": {"mode": mode, "clock": clock, "threads": threads, "cases": list(only)},
    }
    guard = _Errors(results)
    _log(f"machine: {results['machine']}")
    models: dict = {}

    def model(name: str):
        if name not in models:
            if name == "minilm":
                models[name] = (common.minilm(), common.minilm_inputs(cfg["minilm_batch"]))
            else:
                spec = cfg["llama"]
                batch, seq = cfg["llama_tokens"]
                models[name] = (_llama(spec), common.token_inputs(spec["vocab"], batch, seq))
        return models[name]

    def entries(case: str, measure) -> None:
        """Run ``measure(model, inputs, rounds, clock, extra)`` for every entry of ``case``."""
        results[case] = {}
        for entry, name, extra, entry_threads, entry_clock, repeats in cfg[case]:
            entry_threads, entry_clock = entry_threads or threads, entry_clock or clock
            _log(f"{case}: {entry} × {repeats} rounds ({entry_threads} threads, {entry_clock})")
            with guard(f"{case}/{entry}"):
                m, inputs = model(name)
                res = _with_threads(
                    entry_threads, threads, measure, m, inputs, repeats, entry_clock, extra
                )
                results[case][entry] = {
                    "model": name,
                    "threads": entry_threads,
                    "clock": entry_clock,
                    **res,
                }

    if "forward" in only:

        def measure_forward(m, inputs, repeats, entry_clock, shape):
            if shape is not None:
                inputs = common.token_inputs(cfg["llama"]["vocab"], *shape)
            return forward.forward_case(m, inputs, repeats, entry_clock)

        entries("forward", measure_forward)
    if "history" in only:
        entries(
            "history",
            lambda m, inputs, repeats, c, _: forward.history_case(
                m, inputs, repeats, c, rounds=cfg["history_rounds"]
            ),
        )
    if "per_sample" in only:
        entries(
            "per_sample",
            lambda m, inputs, repeats, c, grad: forward.per_sample_case(
                m, inputs, repeats, c, grad=bool(grad)
            ),
        )
    if "moe" in only:
        _log(f"moe: {cfg['moe']} × {cfg['moe_repeats']} rounds")
        with guard("moe"):
            results["moe"] = moe.run_moe(cfg["moe"], cfg["moe_tokens"], cfg["moe_repeats"], clock)
    if not smoke:
        models.pop("llama", None)
    if "pissa_svd" in only:
        _log(f"pissa_svd: {cfg['svd_shapes']}")
        with guard("pissa_svd"):
            m, _ = model("llama" if smoke else "minilm")  # the spectrum profile's source
            results["pissa_svd"] = pissa_svd.pissa_svd_case(
                m, cfg["svd_shapes"], 4 if smoke else 16, cfg["svd_repeats"], clock
            )
    models.clear()
    if "calibration" in only:
        _log(f"calibration: {cfg['calibration_tokens']} tokens")
        with guard("calibration"):
            spec = cfg["llama"] if smoke else CALIBRATION_MODEL
            results["calibration"] = calibration_memory.calibration_memory_case(
                _llama(spec),
                spec["vocab"],
                cfg["calibration_tokens"],
                batch=2 if smoke else 8,
                seq=64 if smoke else 128,
                layer_range=(0, 1),
            )
    if "compile" in only:
        _log("compile: recompilations when c changes")
        with guard("compile"):
            inputs = common.token_inputs(COMPILE_MODEL["vocab"], 2, 16)
            comp_model = _llama(COMPILE_MODEL, layers=1 if smoke else 2)
            results["compile"] = compile_recompiles.compile_case(comp_model, inputs)
    if "checkpoint" in only:
        layers = cfg["checkpoint_layers"]
        _log(f"checkpoint: save/load, {layers} layers")
        with guard("checkpoint"):
            spec = cfg["llama"] if smoke else CHECKPOINT_MODEL
            results["checkpoint"] = checkpoint_io.checkpoint_case(
                _llama(spec, layers=layers), cfg["checkpoint_repeats"], clock
            )
    if "ddp" in only:
        shape = cfg["ddp_tokens"]
        _log(f"ddp: 2 processes (gloo), a training step, {shape} tokens per rank")
        with guard("ddp"):
            results["ddp"] = ddp_step.ddp_case(cfg["llama"], shape, cfg["ddp_repeats"])
    results["seconds"] = time.perf_counter() - start
    results["machine"]["load_average_1m_at_end"] = round(common.os.getloadavg()[0], 2)
    results["targets"] = report.targets(results)
    results["notes"] = report.notes(results)
    return results


def run_folder() -> Path:
    """A new ``benchmarks/results/runs/<date>_<time>/`` (gitignored): a plain run never
    overwrites the committed tables."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return RESULTS / "runs" / stamp


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    group.add_argument("--smoke", action="store_true", help="tiny models (for the tests)")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated of {CASES}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=common.CLOCKS, default="cpu")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for latest.json/.md (default: a new benchmarks/results/runs/<date>_<time>/)",
    )
    where.add_argument(
        "--update",
        action="store_true",
        help="write the committed benchmarks/results/latest.json/.md (the README's tables)",
    )
    args = parser.parse_args(argv)
    out = RESULTS if args.update else args.out or run_folder()
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    only = tuple(c.strip() for c in args.only.split(",") if c.strip())
    warnings.filterwarnings("ignore", category=FutureWarning)
    results = run(mode, only, args.clock, args.threads)
    json_path, md_path = report.write(results, out)
    print(report.markdown(results))
    _log(f"wrote {json_path} and {md_path} in {results['seconds']:.0f} s")
    if results.get("errors"):
        raise SystemExit(f"benchmark case(s) failed: {sorted(results['errors'])}")
    return results


if __name__ == "__main__":
    main()
