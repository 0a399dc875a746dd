"""Checkpoint format v1 did not change with the nn.Module redesign.

Files written by release 0.1.0 (``tests/fixtures/release_0_1``, made by
``tests/fixtures/make_release_0_1.py`` before the redesign) load and reproduce the logits stored
beside them; files written now carry the same metadata keys and load in release 0.1.0's reader
(taken from the git history when it is available).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modlora as ml
from tests import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "release_0_1"
RELEASE_0_1 = "44220c6"
C = 1.3
ADDED_KEYS = {"integrity"}
"""Optional, JSON-encoded metadata keys added after 0.1.0 (release 0.1.0's reader ignores them)."""


def _stored_base():
    model = tiny.llama()
    model.load_state_dict(load_file(str(FIXTURES / "base.safetensors")))
    return model.eval()


@pytest.mark.parametrize("kind", ["lora", "pissa", "history"])
def test_release_0_1_files_load_and_give_the_stored_outputs(kind):
    model, outputs = _stored_base(), load_file(str(FIXTURES / "outputs.safetensors"))
    x = outputs["tokens"]
    with torch.no_grad():
        assert torch.equal(model(x).logits, outputs["base"])
        adapter = ml.load_adapter(model, FIXTURES / f"{kind}.safetensors")
        if kind == "history":
            got = model(x).logits
            adapter.remove()
        else:
            with adapter(model, c=C):
                got = model(x).logits
    # fp32: the hook now scales inside one addmm (alpha = c·scale) where 0.1.0 folded c into B.
    torch.testing.assert_close(got, outputs[kind])
    assert not torch.allclose(got, outputs["base"])


def test_files_written_now_have_the_release_0_1_metadata_keys(tmp_path):
    model = _stored_base()
    for kind in ("lora", "pissa", "history"):
        old = ml.read_metadata(FIXTURES / f"{kind}.safetensors")
        adapter = ml.load_adapter(model, FIXTURES / f"{kind}.safetensors", attach=False)
        adapter.save(tmp_path / f"{kind}.safetensors")
        new = ml.read_metadata(tmp_path / f"{kind}.safetensors")
        assert old.keys() <= new.keys(), kind
        assert new.keys() - old.keys() <= ADDED_KEYS, kind  # only optional keys are added
        same = {k for k in old if k != "modlora_version" and old[k] == new[k]}
        assert same == set(old) - {"modlora_version"}, sorted(set(old) - same)
        tensors_old = load_file(str(FIXTURES / f"{kind}.safetensors"))
        tensors_new = load_file(str(tmp_path / f"{kind}.safetensors"))
        assert tensors_old.keys() == tensors_new.keys()
        assert all(torch.equal(tensors_old[k], tensors_new[k]) for k in tensors_old)


def _release_0_1_package(dest: Path) -> Path | None:
    git = shutil.which("git")
    root = Path(__file__).resolve().parents[1]
    if git is None or not (root / ".git").exists():
        return None
    archive = subprocess.run(
        [git, "-C", str(root), "archive", RELEASE_0_1, "modlora"], capture_output=True
    )
    if archive.returncode != 0:
        return None
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def test_files_written_now_load_in_the_release_0_1_reader(tmp_path):
    old = _release_0_1_package(tmp_path / "old")
    if old is None:
        pytest.skip("release 0.1.0's code is not in this checkout's git history")
    model = _stored_base()
    outputs = load_file(str(FIXTURES / "outputs.safetensors"))
    for kind in ("lora", "pissa", "history"):
        adapter = ml.load_adapter(model, FIXTURES / f"{kind}.safetensors", attach=False)
        adapter.save(tmp_path / f"{kind}.safetensors")
    script = textwrap.dedent(
        f"""
        import json, torch, modlora
        from safetensors.torch import load_file
        from tests import tiny
        assert modlora.__version__ == "0.1.0", modlora.__file__
        model = tiny.llama()
        model.load_state_dict(load_file({str(FIXTURES / "base.safetensors")!r}))
        model.eval()
        x = load_file({str(FIXTURES / "outputs.safetensors")!r})["tokens"]
        out = {{}}
        with torch.no_grad():
            for kind in ("lora", "pissa", "history"):
                a = modlora.load_adapter(model, {str(tmp_path)!r} + f"/{{kind}}.safetensors")
                if kind == "history":
                    y = model(x).logits
                    a.remove()
                else:
                    with a(model, c={C}):
                        y = model(x).logits
                out[kind] = y.tolist()
        print(json.dumps(out))
        """
    )
    root = Path(__file__).resolve().parents[1]  # for tests.tiny; the old modlora comes first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(root)])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for kind in ("lora", "pissa", "history"):
        torch.testing.assert_close(torch.tensor(got[kind]), outputs[kind])
