"""A fork server for ``tests/test_reliability_kill.py``: imports once, then forks one writer per
request, so each kill point costs a fork instead of a fresh interpreter.

Protocol, one line each: stdin ``run <op> <folder>``; stdout ``child <pid>`` once the child is
about to write, and ``exit <status>`` when it has ended (``-N``: killed by signal N). The child writes ``op`` again and again, alternating the two
adapters ``folder/a1.safetensors`` and ``folder/a2.safetensors``:

* ``save``: ``adapter.save(folder/out/adapter.safetensors)``
* ``merge``: ``merge_checkpoint(folder/base, a_k, folder/out/merged, overwrite=True)``
* ``export``: ``export_peft(adapter, folder/out/peft, overwrite=True)``
"""

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool to lose across fork()

import modlora as ml  # noqa: E402
from tests import tiny  # noqa: E402

_BUILT: dict = {}


def build(folder: Path) -> tuple[list[Path], list]:
    """The two adapter files and the adapters loaded from them (built once per folder, in the
    server, so a forked child starts writing at once)."""
    if folder not in _BUILT:
        model = tiny.llama()
        files = [folder / "a1.safetensors", folder / "a2.safetensors"]
        _BUILT[folder] = files, [ml.load_adapter(model, f) for f in files]
    return _BUILT[folder]


def write_loop(op: str, folder: Path, ready: int) -> None:
    files, adapters = build(folder)
    out = folder / "out"
    os.write(ready, b"1")  # the server announces this child only now
    os.close(ready)
    steps = {
        "save": lambda k: adapters[k].save(out / "adapter.safetensors"),
        "merge": lambda k: ml.merge_checkpoint(
            folder / "base", files[k], out / "merged", overwrite=True
        ),
        "export": lambda k: ml.export_peft(adapters[k], out / "peft", overwrite=True),
    }
    k = 1
    while True:
        steps[op](k)
        k = 1 - k


def main() -> None:
    for line in sys.stdin:
        _, op, folder = line.split()
        build(Path(folder))
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_end)
                write_loop(op, Path(folder), write_end)
            except KeyboardInterrupt:
                code = 130
            except BaseException:
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(write_end)
        os.read(read_end, 1)  # the child is about to write
        os.close(read_end)
        print(f"child {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {code}", flush=True)


if __name__ == "__main__":
    main()
