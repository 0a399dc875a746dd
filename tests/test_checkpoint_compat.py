"""Checkpoint format v1 did not change with the nn.Module redesign.

Files written by release 0.1.0 (its code taken from the git history, run on
``tests/release_0_1_writer.py``) load and reproduce the logits it stored beside them; files written
now carry the same metadata keys and load in release 0.1.0's reader. Without the git history
(an exported tree) these tests skip.
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

ROOT = Path(__file__).resolve().parents[1]
RELEASE_0_1 = "44220c6"
C = 1.3
ADDED_KEYS = {"integrity"}
"""Optional, JSON-encoded metadata keys added after 0.1.0 (release 0.1.0's reader ignores them)."""


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    """``(release 0.1.0's package folder, the files it wrote)``."""
    root = tmp_path_factory.mktemp("release_0_1")
    old = _release_0_1_package(root / "old")
    if old is None:
        pytest.skip("release 0.1.0's code is not in this checkout's git history")
    files = root / "files"
    files.mkdir()
    done = _run_release_0_1(old, ["-m", "tests.release_0_1_writer", str(files)], root)
    assert done.returncode == 0, done.stderr[-3000:]
    return old, files


def _run_release_0_1(old: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python <args>`` with release 0.1.0's modlora first on the path (then this checkout, for
    ``tests.tiny``), outside the checkout so its own ``modlora`` is not found first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(ROOT)])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


def _stored_base(files: Path):
    model = tiny.llama()
    model.load_state_dict(load_file(str(files / "base.safetensors")))
    return model.eval()


@pytest.mark.parametrize("kind", ["lora", "pissa", "history"])
def test_release_0_1_files_load_and_give_the_stored_outputs(release, kind):
    _, files = release
    model, outputs = _stored_base(files), load_file(str(files / "outputs.safetensors"))
    x = outputs["tokens"]
    with torch.no_grad():
        assert torch.equal(model(x).logits, outputs["base"])
        adapter = ml.load_adapter(model, files / f"{kind}.safetensors")
        if kind == "history":
            got = model(x).logits
            adapter.remove()
        else:
            with adapter(model, c=C):
                got = model(x).logits
    # fp32: the hook now scales inside one addmm (alpha = c·scale) where 0.1.0 folded c into B.
    torch.testing.assert_close(got, outputs[kind])
    assert not torch.allclose(got, outputs["base"])


def test_files_written_now_have_the_release_0_1_metadata_keys(release, tmp_path):
    _, files = release
    model = _stored_base(files)
    for kind in ("lora", "pissa", "history"):
        old = ml.read_metadata(files / f"{kind}.safetensors")
        adapter = ml.load_adapter(model, files / f"{kind}.safetensors", attach=False)
        adapter.save(tmp_path / f"{kind}.safetensors")
        new = ml.read_metadata(tmp_path / f"{kind}.safetensors")
        assert old.keys() <= new.keys(), kind
        assert new.keys() - old.keys() <= ADDED_KEYS, kind  # only optional keys are added
        same = {k for k in old if k != "modlora_version" and old[k] == new[k]}
        assert same == set(old) - {"modlora_version"}, sorted(set(old) - same)
        tensors_old = load_file(str(files / f"{kind}.safetensors"))
        tensors_new = load_file(str(tmp_path / f"{kind}.safetensors"))
        assert tensors_old.keys() == tensors_new.keys()
        assert all(torch.equal(tensors_old[k], tensors_new[k]) for k in tensors_old)


def _release_0_1_package(dest: Path) -> Path | None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return None
    archive = subprocess.run(
        [git, "-C", str(ROOT), "archive", RELEASE_0_1, "modlora"], capture_output=True
    )
    if archive.returncode != 0:
        return None
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def test_files_written_now_load_in_the_release_0_1_reader(release, tmp_path):
    old, files = release
    model = _stored_base(files)
    outputs = load_file(str(files / "outputs.safetensors"))
    for kind in ("lora", "pissa", "history"):
        adapter = ml.load_adapter(model, files / f"{kind}.safetensors", attach=False)
        adapter.save(tmp_path / f"{kind}.safetensors")
    script = textwrap.dedent(
        f"""
        import json, torch, modlora
        from safetensors.torch import load_file
        from tests import tiny
        assert modlora.__version__ == "0.1.0", modlora.__file__
        model = tiny.llama()
        model.load_state_dict(load_file({str(files / "base.safetensors")!r}))
        model.eval()
        x = load_file({str(files / "outputs.safetensors")!r})["tokens"]
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
    done = _run_release_0_1(old, ["-c", script], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for kind in ("lora", "pissa", "history"):
        torch.testing.assert_close(torch.tensor(got[kind]), outputs[kind])
