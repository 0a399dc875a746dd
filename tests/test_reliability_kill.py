"""Kill test: a save, an offline merge and a PEFT export are killed at random points (SIGKILL,
SIGTERM, SIGINT) in a subprocess; every time, the output is one complete version, never a
mixture, and it loads. Temporary files are gone after SIGTERM / SIGINT, and after SIGKILL the
next write of the same output removes them.

The writers are forked from one server process (``tests/kill_worker.py``) that imported
torch and modlora once, so each of the 27 kill points costs a fork, not an interpreter start.
"""

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import modlora as ml
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
OPS = ("save", "merge", "export")
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
REPEATS = 3  # 3 ops x 3 signals x 3 = 27 kill points


def _content(path: Path):
    """A file's content; for safetensors its metadata and tensor bytes (safetensors writes the
    metadata in no fixed order, so equal files need not be equal bytes)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with safe_open(str(path), "pt") as f:
        meta = sorted((f.metadata() or {}).items())
        keys = list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
        tensors = {k: f.get_tensor(k).view(-1).view(torch.uint8).numpy().tobytes() for k in keys}
    return meta, tensors


def _tree(folder: Path) -> dict:
    if folder.is_file():
        return {"": _content(folder)}
    return {str(p.relative_to(folder)): _content(p) for p in folder.rglob("*") if p.is_file()}


def _temps(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if ".modlora-" in p.name and p.name.endswith(".tmp")
    )


def _write(op: str, folder: Path, k: int, dest: Path) -> None:
    """One write of version ``k`` (0 or 1) to ``dest``, in this process (the references)."""
    model = tiny.llama()
    file = folder / f"a{k + 1}.safetensors"
    if op == "merge":
        ml.merge_checkpoint(folder / "base", file, dest, overwrite=True)
        return
    adapter = ml.load_adapter(model, file)
    if op == "save":
        adapter.save(dest)
    else:
        ml.export_peft(adapter, dest, overwrite=True)


OUTPUT = {"save": "adapter.safetensors", "merge": "merged", "export": "peft"}


def _loads(op: str, path: Path) -> None:
    model = tiny.llama()
    if op == "save":
        ml.load_adapter(model, path)
    elif op == "export":
        ml.import_peft(model, path)
    else:
        import transformers as tf

        merged = tf.AutoModelForCausalLM.from_pretrained(str(path))
        assert torch.isfinite(merged(tiny.tokens()).logits).all()


@pytest.fixture(scope="module")
def server():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kill_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    yield proc
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a test failed with a writer still running
        proc.kill()
        proc.wait()


def _line(proc, prefix: str, timeout: float = 300.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the kill worker said nothing for {timeout:.0f}s (waiting for {prefix!r})"
    line = proc.stdout.readline()
    assert line.startswith(prefix), f"expected {prefix!r} from the kill worker, got {line!r}"
    return line.split(maxsplit=1)[1].strip() if " " in line.strip() else ""


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_killed_writes_leave_a_complete_output(op, server, tmp_path):
    model = tiny.llama()
    model.save_pretrained(str(tmp_path / "base"), max_shard_size="20KB")
    for k in (1, 2):
        tiny.signed_lora(model, seed=k).save(tmp_path / f"a{k}.safetensors", c=0.5 * k)
    (tmp_path / "out").mkdir()
    refs = []
    for k in (0, 1):
        ref = tmp_path / f"ref{k}" / OUTPUT[op]
        ref.parent.mkdir()
        _write(op, tmp_path, k, ref)
        _loads(op, ref)
        refs.append(_tree(ref))
    assert refs[0] != refs[1]
    out = tmp_path / "out" / OUTPUT[op]
    _write(op, tmp_path, 0, out)  # the previous output

    rng = random.Random(f"kill-{op}")
    seen = []
    for sig in SIGNALS * REPEATS:
        server.stdin.write(f"run {op} {tmp_path}\n")
        server.stdin.flush()
        pid = int(_line(server, "child"))
        delay = rng.uniform(0.0, 0.4)
        time.sleep(delay)
        try:
            os.kill(pid, sig)
        finally:
            status = int(_line(server, "exit", timeout=60))
        seen.append((sig.name, round(delay, 3), status))
        assert _tree(out) in refs, f"{op} killed by {sig.name} after {delay:.3f}s: output mixed"
        left = _temps(tmp_path / "out")
        if sig != signal.SIGKILL:
            assert left == [], f"{sig.name} left temporary files"
        seen[-1] += (len(left),)  # SIGKILL mid-write leaves them: proof the kill hit a write
    _loads(op, out)
    _write(op, tmp_path, 0, out)  # a later write removes what SIGKILL left
    assert _temps(tmp_path / "out") == []
    assert _tree(out) == refs[0]
    assert len(seen) == len(SIGNALS) * REPEATS
    print(f"{op} (signal, delay s, exit status, temporaries left): {seen}")
