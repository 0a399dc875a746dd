"""benchmarks/ddp_step.py: a smoke run of the 2-process DDP step writes its ratio and checks.

No timing is asserted (smoke numbers on a tiny model mean nothing); what is checked is that the
hooked LoRA and PEFT's take the same step under DDP, and the shape of the report.
"""

import json

import pytest
import torch

from benchmarks import run as bench


@pytest.mark.slow
def test_smoke_ddp_step_reports_hooked_vs_peft(tmp_path):
    threads = torch.get_num_threads()
    try:
        bench.main(["--smoke", "--only", "ddp", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "latest.json").read_text())
    assert "errors" not in data
    ddp = data["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    # Same factors, same data, same SGD step: equal up to fp32 summation order.
    assert ddp["check"]["factors_after_one_step_max_abs"] < 1e-6
    assert ddp["check"]["factors_moved_by_the_step_max_abs"] > 0
    for clock in ("wall", "cpu"):
        d = ddp["clocks"][clock]
        assert set(d["cases"]) == {"hooked", "peft"} and d["hooked_vs_peft"] > 0
    target = "2-process DDP training step: hooked LoRA r=16 / PEFT LoRA r=16"
    assert target in {t["target"] for t in data["targets"]}
    assert "### 8. DDP training step" in (tmp_path / "latest.md").read_text()
