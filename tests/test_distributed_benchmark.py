"""benchmarks/ddp_step.py: the 2-process DDP step's ratio in the report (no processes here).

The measurement itself runs on 2 ranks inside tests/test_ddp.py (``ddp_step.measure``, where
the hooked and PEFT steps are checked to give the same update); here its output is summarised
and reported. No timing is asserted: the samples are made up.
"""

from benchmarks import ddp_step, report

SPEC = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128}


def _measured(hooked: list[float], peft: list[float]) -> dict:
    samples = {"hooked": {"wall": hooked, "cpu": hooked}, "peft": {"wall": peft, "cpu": peft}}
    check = {"factors_after_one_step_max_abs": 0.0, "factors_moved_by_the_step_max_abs": 1e-3}
    return {"samples": samples, "check": check}


def test_summary_target_and_markdown_of_the_ddp_case():
    result = ddp_step.summarise(_measured([0.9, 2.0, 1.1], [1.0, 2.5, 1.0]), SPEC, (1, 8), r=16)
    wall = result["clocks"]["wall"]
    assert wall["hooked_vs_peft"] == 0.9  # median of the per-round ratios 0.9, 0.8, 1.1
    assert wall["hooked_vs_peft_min"] == 0.9  # min 0.9 / min 1.0
    results = {"ddp": result}
    (target,) = report.targets(results)
    assert target["target"] == "2-process DDP training step: hooked LoRA r=16 / PEFT LoRA r=16"
    assert target["met"] and target["value"] == 0.9
    results.update(
        machine={
            "cpu": "x",
            "cores": 2,
            "torch": "t",
            "cpu_capability": "c",
            "torch_threads": 1,
            "transformers": "tf",
            "peft": "p",
            "load_average_1m_at_start": 0.0,
        },
        settings={"mode": "smoke", "clock": "cpu"},
        date="d",
        seconds=1.0,
        targets=[target],
    )
    md = report.markdown(results)
    assert "### 8. DDP training step, 2 processes (gloo, 1 thread each)" in md
    assert "| wall | " in md and "**0.900**" in md
