"""benchmarks/: a tiny run writes latest.json and latest.md with every expected key.

No timing is ever asserted here: the numbers of a smoke run on tiny models mean nothing. What is
checked is the shape of the output and the correctness checks the benchmark itself makes (the
hooked adapter computes the same function as PEFT, the merged model and the separate rounds).
"""

import json

import pytest
import torch

from benchmarks import report
from benchmarks import run as bench

FAST = ("forward", "per_sample", "pissa_svd", "checkpoint")
TOP_KEYS = {"date", "machine", "settings", "seconds", "targets", "notes"}


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _load(folder):
    data = json.loads((folder / "latest.json").read_text())
    md = (folder / "latest.md").read_text()
    return data, md


def test_plain_run_writes_a_new_run_folder_and_update_the_committed_tables(
    tmp_path, keep_threads, monkeypatch
):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.main(["--smoke", "--only", "pissa_svd"])
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and {p.name for p in runs[0].iterdir()} == {"latest.json", "latest.md"}
    assert not (tmp_path / "latest.md").exists(), "a plain run must not touch the committed tables"
    bench.main(["--smoke", "--only", "pissa_svd", "--update"])
    assert _load(tmp_path)[0]["settings"]["mode"] == "smoke"
    assert len(list((tmp_path / "runs").iterdir())) == 1
    with pytest.raises(SystemExit):  # one destination: --out and --update exclude each other
        bench.main(["--smoke", "--only", "pissa_svd", "--update", "--out", str(tmp_path)])


def test_smoke_run_writes_json_and_markdown(tmp_path, keep_threads):
    bench.main(["--smoke", "--only", ",".join(FAST), "--out", str(tmp_path)])
    data, md = _load(tmp_path)
    assert TOP_KEYS | set(FAST) <= data.keys()
    assert {"cpu", "cores", "torch", "torch_threads", "load_average_1m_at_start"} <= set(
        data["machine"]
    )
    assert data["machine"]["torch_threads"] == 1 and data["settings"]["mode"] == "smoke"
    assert "errors" not in data

    for fwd in data["forward"].values():  # smoke: the tiny Llama-shaped model only
        assert set(fwd["cases"]) == {
            "base",
            "base_again",
            "hooked_c1",
            "hooked_c0",
            "merged",
            "peft",
        }
        for name, case in fwd["cases"].items():
            assert {"cpu", "wall", "x_base", "x_base_min", "samples_ms"} <= set(case)
            # One round: each case once, sandwiched between base runs (1 + 5 of them).
            assert case["cpu"]["n"] == (6 if name == "base" else 1)
        assert set(fwd["ratios"]) >= {"base_again_vs_base", "hooked_c1_vs_peft", "merged_vs_base"}
        # Same factors in PEFT and modlora: the same function up to fp32 summation order.
        assert fwd["check"]["hooked_vs_peft_max_abs"] < 1e-4
        assert fwd["check"]["hooked_vs_merged_max_abs"] < 1e-3  # merged: W + BA rounded once
        assert fwd["check"]["hooked_vs_base_max_abs"] > 0  # the adapter does something

    for key, mode in (("llama", "no-grad forward"), ("llama_grad", "forward+backward")):
        per = data["per_sample"][key]
        assert per["mode"] == mode
        assert set(per["cases"]) == {"base", "scalar_c", "per_sample_c", "two_forwards"}
        assert per["check"]["per_sample_vs_two_forwards_max_abs"] < 1e-4  # fp32 summation order

    svd = data["pissa_svd"]["shapes"]["128x128"]
    assert {"speedup_randomized_vs_full", "agreement_u", "agreement_vh"} <= set(svd)
    assert 0.0 <= svd["agreement_u"] <= 1.0 + 1e-6  # a mean of cos², fp32 round-off above 1

    ck = data["checkpoint"]
    assert ck["round_trip_equal"] and ck["targets"] == 14
    assert set(ck["ratios"]) == {
        "save_vs_raw_cpu",
        "save_vs_raw_wall",
        "load_vs_raw_cpu",
        "load_vs_raw_wall",
    }

    assert {t["target"] for t in data["targets"]} >= {
        "llama: hooked LoRA r=16 (c=1) / PEFT LoRA r=16",
        "llama: hooked at c=0 / base",
    }
    assert md.startswith("## Performance")
    for heading in (
        "### Targets",
        "### 1. Forward pass",
        "### 3. Per-sample c",
        "### 4. PiSSA",
        "### 7. Checkpoint",
    ):
        assert heading in md
    assert data["machine"]["cpu"] in md and data["machine"]["torch"] in md


@pytest.mark.slow
def test_smoke_history_calibration_and_compile(tmp_path, keep_threads):
    bench.main(["--smoke", "--only", "history,calibration,compile", "--out", str(tmp_path)])
    data, md = _load(tmp_path)
    hist = data["history"]["llama"]
    assert set(hist["cases"]) == {
        "base",
        "history_1",
        "separate_1",
        "single_r16",
        "history_2",
        "separate_2",
        "single_r32",
    }
    # A history is the exact concatenation of its rounds: same function as attaching them all.
    assert hist["check"]["history_2_vs_separate_2_max_abs"] < 1e-4
    cal = data["calibration"]
    assert [row["tokens"] for row in cal["tokens"].values()] == [256, 512]
    assert all(row["nbytes"] > 0 for row in cal["tokens"].values())
    comp = data["compile"]
    assert comp["recompiles_set_coeff"] == 0 and comp["compiled_vs_eager_max_abs"] < 1e-4
    for heading in ("### 2. HistoryBake", "### 5. Calibration memory", "### 6. torch.compile"):
        assert heading in md


def test_unknown_case_is_refused_and_nothing_is_written(tmp_path, keep_threads):
    with pytest.raises(ValueError, match=r"unknown case\(s\) \['bogus'\]"):
        bench.main(["--smoke", "--only", "forward,bogus", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def _fwd(hooked_vs_peft, c0, merged, base_again=1.01):
    ratios = {
        "base_again_vs_base": base_again,
        "hooked_c1_vs_peft": hooked_vs_peft,
        "hooked_c0_vs_base": c0,
        "merged_vs_base": merged,
    }
    return {"ratios": ratios, "flop_floor_vs_peft": 0.8, "flop_floor_vs_base": 1.06}


def test_targets_flag_met_and_missed():
    results = {"forward": {"minilm": _fwd(0.84, 1.02, 1.025), "llama": _fwd(0.9, 1.05, 1.04)}}
    met = {t["target"]: t["met"] for t in report.targets(results)}
    assert met == {
        "minilm: hooked LoRA r=16 (c=1) / PEFT LoRA r=16": True,
        "minilm: hooked at c=0 / base": True,
        "minilm: merged / base": True,  # 1.025 <= 1.02 + the 0.01 noise floor
        "llama: hooked LoRA r=16 (c=1) / PEFT LoRA r=16": False,
        "llama: hooked at c=0 / base": False,
        "llama: merged / base": False,
    }


def test_interleave_sandwiches_every_case_between_reference_runs():
    from benchmarks.common import Case, interleave

    calls = []
    cases = {
        "base": lambda: calls.append("base"),
        "a": Case(lambda: calls.append("a"), setup=lambda: calls.append("setup a")),
        "b": lambda: calls.append("b"),
    }
    samples = interleave(cases, repeats=2, warmup=0, reference="base")
    assert calls == (
        ["base", "setup a", "a", "base", "b", "base"]  # round 0
        + ["base", "b", "base", "setup a", "a", "base"]  # round 1: rotated start
    )
    assert len(samples["base"]["cpu"]) == 6
    assert len(samples["a"]["cpu"]) == len(samples["a"]["ref_cpu"]) == 2


def test_paired_ratio_divides_by_the_neighbouring_reference_runs():
    from benchmarks.common import min_ratio, overhead_ratio, paired_ratio

    # Round 1 ran twice as slow as round 0 (machine drift): the paired ratios cancel it.
    samples = {
        "base": {"cpu": [1.0, 1.0, 2.0, 2.0]},
        "a": {"cpu": [1.2, 2.4], "ref_cpu": [1.0, 2.0]},
        "b": {"cpu": [1.5, 3.0], "ref_cpu": [1.0, 2.0]},
    }
    assert paired_ratio(samples, "a", "base", "cpu") == pytest.approx(1.2)
    assert paired_ratio(samples, "a", "b", "cpu") == pytest.approx(0.8)
    assert paired_ratio(samples, "base", "b", "cpu") == pytest.approx(1 / 1.5)
    assert min_ratio(samples, "a", "base", "cpu") == pytest.approx(1.2)
    assert overhead_ratio(samples, "a", "b", "base", "cpu") == pytest.approx(0.2 / 0.5)
    plain = {"x": {"cpu": [2.0, 4.0, 9.0]}, "y": {"cpu": [1.0, 2.0, 3.0]}}
    assert paired_ratio(plain, "x", "y", "cpu") == 2.0
