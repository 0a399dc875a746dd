"""The frontier bisection, the calibration split, the seed's training pairs and the intervals."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from jaxtyping import install_import_hook

import modlora as ml

with install_import_hook("experiments", "beartype.beartype"):
    from experiments import evaluate as evaluate_mod
    from experiments.build import build_meters
    from experiments.calibrate import calibrate
    from experiments.config import validate
    from experiments.frontier import frontier, search
    from experiments.metrics import EncoderMeter
    from experiments.models import tiny_bert
    from experiments.paths import CONF_DIR
    from experiments.stats import bootstrap, flip_stat, mean_stat, ratio_interval, value
    from experiments.steering import SteeringVector, block_list
    from experiments.train import run


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# ---------------------------------------------------------------- bisection on synthetic curves
@pytest.mark.parametrize("k", [0.003, 1.0, 40.0])  # the level sits at c ≈ 50, ≈ 0.3, ≈ 0.004
@pytest.mark.parametrize("level", [0.99, 0.95, 0.90])
def test_search_finds_the_requested_cosine_within_tolerance(k, level):
    def measure(c):
        return {"c": c, "cosine": 1 / math.sqrt(1 + (k * c) ** 2)}

    tol = 0.02 * (1 - level)
    found = search(
        measure,
        lambda r: r["cosine"] >= level,
        lambda r: abs(r["cosine"] - level) <= tol,
        start=1.0,
        c_max=1e4,
        max_evals=40,
    )
    assert found["close"] and abs(found["row"]["cosine"] - level) <= tol
    exact = math.sqrt(1 / level**2 - 1) / k
    # |cos − level| <= tol bounds c to within a few percent of the exact crossing here
    assert found["c"] == pytest.approx(exact, rel=0.05)
    assert found["evals"] <= 25


@pytest.mark.parametrize("level", [0.1, 0.5, 1.0])
def test_search_finds_the_requested_kl_within_tolerance(level):
    def measure(c):
        return {"c": c, "kl": 0.3 * c**2}

    tol = 0.02 * level
    found = search(
        measure, lambda r: r["kl"] <= level, lambda r: abs(r["kl"] - level) <= tol, max_evals=40
    )
    assert found["close"] and abs(found["row"]["kl"] - level) <= tol


def test_search_reports_a_level_it_cannot_reach():
    def measure(c):  # the cosine never falls below 0.97
        return {"c": c, "cosine": 0.97 + 0.03 / (1 + c**2)}

    found = search(
        measure, lambda r: r["cosine"] >= 0.95, lambda r: abs(r["cosine"] - 0.95) <= 1e-3, c_max=64
    )
    assert not found["close"] and found["hi"] is None and found["c"] == 64


class _FloorMeter:
    """A meter whose cosine falls from 1 towards a floor of 0.97 as |c| grows (3 items)."""

    frontier_key, higher_is_better, shift = "cosine", True, "logit_shift"

    def stats(self, method, c):
        cos = torch.full((3,), 0.97 + 0.03 / (1 + c**2))
        return {"cosine": mean_stat(cos), "logit_shift": mean_stat(torch.full((3,), c))}


def test_frontier_flags_levels_beyond_the_floor_and_stops_searching():
    front, _ = frontier(_FloorMeter(), None, [0.99, 0.95, 0.90], 0.02, 64.0, 40, n_boot=20)
    for sign in ("+", "-"):
        assert front["0.99"][sign]["reached"]
        assert not front["0.95"][sign]["reached"] and abs(front["0.95"][sign]["c"]) == 64
        # the harder level is not searched again: same point, no evaluations
        assert front["0.90"][sign]["c"] == front["0.95"][sign]["c"]
        assert front["0.90"][sign]["evals"] == 0


def test_search_without_a_target_brackets_the_boundary_to_rel_tol():
    found = search(lambda c: {"c": c}, lambda r: r["c"] <= 3.7, rel_tol=0.01, max_evals=60)
    assert found["lo"] <= 3.7 < found["hi"] and found["hi"] - found["lo"] <= 0.01 * found["hi"]
    assert found["c"] == found["lo"]


# ---------------------------------------------------------------- on a real (tiny) encoder
@pytest.fixture(scope="module")
def bert():
    model, tokenizer = tiny_bert(hidden_size=32, num_layers=4, seed=0)
    return model.requires_grad_(False), tokenizer


TEXTS = ["The meeting starts at ten.", "My brother is an electrician.", "The lake freezes."] * 3


def test_frontier_hits_each_cosine_level_for_a_steering_vector(bert):
    model, tokenizer = bert
    meter = EncoderMeter(model, tokenizer, TEXTS, 32, 16)
    block = block_list(model)[2]
    vector = SteeringVector(
        block, torch.randn(32, generator=torch.Generator().manual_seed(0)), "v", 2
    )
    levels = [0.99, 0.95, 0.90]
    front, curve = frontier(meter, vector, levels, rel_tol=0.02, c_max=1e4, max_evals=40)
    for level in levels:
        for sign in ("+", "-"):
            entry = front[f"{level:.2f}"][sign]
            assert entry["reached"], (level, sign, entry)
            assert abs(entry["cosine"] - level) <= 0.02 * (1 - level)
            assert (entry["c"] > 0) == (sign == "+")
            lo, hi = entry["ci"]["cosine"]
            assert lo <= entry["cosine"] <= hi
    assert {r["c"] for r in curve} >= {0.0} and curve == sorted(curve, key=lambda r: r["c"])


def test_calibration_measures_only_the_validation_split(bert, monkeypatch):
    model, tokenizer = bert
    cfg = _compose(["model=tiny_bert", "data.n_train=40"])
    data = validate(cfg)
    seen: list[str] = []

    class Recorder:  # records every sentence handed to the tokenizer
        def __call__(self, texts, **kw):
            seen.extend(texts)
            return tokenizer(texts, **kw)

    meters = build_meters(cfg, model, Recorder(), data)
    val = [p.chosen for p in data.val] + [p.rejected for p in data.val]
    assert meters["val"].texts == val
    lora = ml.ModulatedLoRA(model, r=4, alpha=8, init="signed", layer_range=None)
    with torch.no_grad():
        for p in lora.parameters():
            p.mul_(20.0)  # make the delta big enough that the gate fails at a moderate c
    seen.clear()
    cal = calibrate(meters["val"], lora, cfg.eval.gates, rel_tol=0.01, max_c=1e4)
    reported = set(data.neutral) | set(data.paraphrases) | set(data.opinionated)
    assert seen and set(seen) <= set(val) and not set(seen) & reported
    assert not set(val) & (reported | set(data.probe_texts))
    # the bisection found the gate's boundary: passes at c, fails just above it at some sign
    c = cal["c"]
    assert cal["calibrated"] and cal["split"] == "val" and c > 0
    assert min(meters["val"](lora, c)["cosine"], meters["val"](lora, -c)["cosine"]) >= 0.9
    above = c * (1 + 2 * 0.01)
    assert min(meters["val"](lora, above)["cosine"], meters["val"](lora, -above)["cosine"]) < 0.9


@pytest.mark.slow
def test_the_run_calibrates_on_the_validation_meter(tmp_path, monkeypatch):
    got = {}
    real = evaluate_mod.calibrate

    def spy(meter, *args, **kw):
        got["texts"] = list(meter.texts)
        return real(meter, *args, **kw)

    monkeypatch.setattr(evaluate_mod, "calibrate", spy)
    overrides = ["model=tiny_bert", "model.loader.num_layers=4", "train=smoke", "train.max_steps=2"]
    fast = ["eval.frontier.max_evals=6", "eval.bootstrap.n=100", "eval.calibration.max_evals=12"]
    cfg = _compose([*overrides, *fast, "data.n_train=20", "plot=false", "train.save_state=false"])
    metrics = run(cfg, tmp_path / "run")
    data = validate(cfg)
    assert got["texts"] == [p.chosen for p in data.val] + [p.rejected for p in data.val]
    assert not set(got["texts"]) & (set(data.neutral) | set(data.opinionated))
    assert metrics["calibration_split"] == "val"
    assert set(metrics["frontier"]) == {
        "adapter",
        "vector_out",
        "vector_mid",
        "random_out",
        "random_mid",
    }
    assert set(metrics["baselines"]) == set(metrics["frontier"]) - {"adapter"}


# ---------------------------------------------------------------- seeds draw the training pairs
def test_seed_redraws_the_training_pairs_and_keeps_the_evaluation_sets():
    a, b, a2 = (validate(_compose([f"seed={s}"])) for s in (0, 1, 0))
    assert {(p.chosen, p.rejected) for p in a.train} != {(p.chosen, p.rejected) for p in b.train}
    assert a.train == a2.train and a.val == a2.val
    for d in (a, b):
        assert not {p.chosen for p in d.train} & {p.chosen for p in d.val}
    assert a.heldout == b.heldout and a.neutral == b.neutral and a.opinionated == b.opinionated
    assert a.probe_texts == b.probe_texts and not set(a.opinionated) & set(a.probe_texts)


# ---------------------------------------------------------------- statistics
def test_flip_stat_counts_items_crossing_to_the_side_of_c():
    base, score = torch.tensor([-1.0, -2.0, 0.5, 3.0]), torch.tensor([1.0, -1.0, 2.0, -1.0])
    assert value(flip_stat(base, score, 1.0)) == 0.5  # of the two negatives, one crossed
    assert value(flip_stat(base, score, -1.0)) == 0.5  # of the two positives, one crossed
    assert value(flip_stat(torch.ones(3), torch.ones(3), 1.0)) is None  # none eligible


def test_bootstrap_interval_of_a_mean_matches_the_normal_width():
    x = torch.randn(400, generator=torch.Generator().manual_seed(1))
    ci = bootstrap({"m": mean_stat(x)}, n_boot=4000, seed=0)["m"]
    mean, se = float(x.mean()), float(x.std() / math.sqrt(len(x)))
    assert ci[0] < mean < ci[1]
    # the percentile interval of a mean of 400 normals is ≈ ±1.96 se (Monte Carlo error ~5%)
    assert (ci[1] - ci[0]) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert bootstrap({"m": mean_stat(x)}, n_boot=4000, seed=0)["m"] == ci
    const = bootstrap({"m": mean_stat(torch.full((9,), 0.25))}, n_boot=50, seed=0)["m"]
    assert const == [0.25, 0.25]


def test_ratio_interval_of_two_samples_of_one_distribution_covers_one():
    g = torch.Generator().manual_seed(2)
    a, b = mean_stat(torch.rand(200, generator=g) + 1), mean_stat(torch.rand(200, generator=g) + 1)
    lo, hi = ratio_interval(a, b, n_boot=2000, seed=0)
    assert lo < 1 < hi and hi - lo < 0.2
