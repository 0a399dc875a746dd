"""The ``python -m experiments.merge`` entry point."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel

from experiments.merge import main
from tests import tiny
from tests.helpers import logits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    """A tiny GPT-2 folder and a LoRA saved with a deployed c; returns (folder, adapter, logits)."""
    model = tiny.gpt2()
    model.save_pretrained(str(tmp_path / "base"))
    lora = tiny.signed_lora(model, layer_range=(1, 3))
    lora.save(tmp_path / "a.safetensors", c=-1.25)
    with lora(model, c=-1.25), torch.no_grad():
        hooked = model(tiny.tokens()).logits
    return tmp_path / "base", tmp_path / "a.safetensors", hooked


def test_merged_folder_at_the_deployed_c(saved, tmp_path, capsys):
    base, adapter, hooked = saved
    out = tmp_path / "merged"
    argv = ["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--c", "deployed"]
    assert main(argv) == 0
    assert "merged 8/8 lora targets at c=-1.25" in capsys.readouterr().out
    torch.testing.assert_close(logits(tf.AutoModelForCausalLM.from_pretrained(str(out))), hooked)


def test_peft_folder(saved, tmp_path):
    base, adapter, hooked = saved
    out = tmp_path / "peft"
    argv = ["--model", str(base), "--adapter", str(adapter), "--out", str(out)]
    assert main([*argv, "--format", "peft", "--c", "-1.25"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        peft_model = PeftModel.from_pretrained(tiny.gpt2(), str(out))
    torch.testing.assert_close(logits(peft_model), hooked)
    with pytest.raises(FileExistsError):
        main([*argv, "--format", "peft"])
    assert main([*argv, "--format", "peft", "--overwrite"]) == 0


def test_bad_arguments(saved, tmp_path, capsys):
    base, _, _ = saved
    argv = ["--model", str(base), "--out", str(tmp_path / "o")]
    assert main([*argv, "--adapter", str(tmp_path / "missing.safetensors")]) == 2
    assert "no adapter file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--adapter", str(tmp_path / "a.safetensors"), "--c", "lots"])
    assert "--c must be a number or 'deployed'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_module_entry_point_runs(saved, tmp_path):
    base, adapter, hooked = saved
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.merge", "--model", str(base)]
    cmd += ["--adapter", str(adapter), "--out", str(out), "--c", "-1.25"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(logits(tf.AutoModelForCausalLM.from_pretrained(str(out))), hooked)
