"""Writing files so that no failure destroys what was there (folders: :mod:`.folder`).

* A write only replaces the one path it was asked to produce. A symlink stays a symlink (the
  file or folder it points to is replaced).
* The new content is written beside the destination under a temporary name and swapped in only
  once complete: a file by ``os.replace``; a folder by ``renameat2(RENAME_EXCHANGE)`` on Linux
  (both names always exist), elsewhere by two renames (a crash between them leaves the old
  folder under a temporary name, which the next write of that folder removes).
* A folder is replaced only if modlora wrote it: it holds a manifest (``.modlora-manifest.json``)
  listing its files and nothing else, or is empty. Outputs may not overlap the inputs or the
  current working directory.
* Temporary files are removed on every exit Python can observe: exceptions, ``KeyboardInterrupt``
  (SIGINT) and, while a write runs in the main thread, SIGTERM / SIGHUP (handled, then re-raised
  with the default action once the temporary files are gone). A SIGKILL leaves them; the next
  write of the same destination removes those whose process is gone.
"""

import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from .io import as_path

_TEMP = re.compile(r"^\.(?P<name>.+)\.modlora-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


# ---------------------------------------------------------------------------- temporary names
@lru_cache(maxsize=1)
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(final: Path) -> Path:
    """A fresh temporary name beside ``final`` that names this host and process."""
    tag = f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return final.parent / f".{final.name}.modlora-{tag}.tmp"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(final: Path) -> list[Path]:
    """Remove the temporary files of earlier writes of ``final`` whose process is gone."""
    removed = []
    for item in final.parent.iterdir() if final.parent.is_dir() else ():
        m = _TEMP.match(item.name)
        if m and m["name"] == final.name and m["host"] == _host() and not _alive(int(m["pid"])):
            _remove(item)
            removed.append(item)
    return removed


# ---------------------------------------------------------------------------- signals
class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP (when nobody handles them) into an exception for the duration, so
    ``except``/``finally`` blocks run; then end the process as the signal's default would."""
    installed = {}
    if threading.current_thread() is threading.main_thread():

        def handler(signum, frame):
            raise _Terminated(signum)

        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                installed[sig] = signal.signal(sig, handler)
    try:
        yield
    except _Terminated as stop:
        for sig, previous in installed.items():
            signal.signal(sig, previous)
        installed = {}
        signal.raise_signal(stop.signum)
        raise
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


# ---------------------------------------------------------------------------- files
def destination(path, what: str = "path") -> Path:
    """The file a write of ``path`` replaces: symlinks followed, the folder must exist."""
    path = as_path(path, what)
    real = Path(os.path.realpath(path))
    if not real.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {real.parent} does not exist")
    if real.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    return real


def new_file_mode() -> int:
    """The permissions ``open()`` gives a new file (``0o666`` less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def file_mode(path: Path) -> int:
    """The permissions a new file at ``path`` would get (an existing file keeps its own)."""
    return path.stat().st_mode & 0o7777 if path.exists() else new_file_mode()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(temp)`` beside it, fsync, then rename over it.

    A failure (or a signal, see the module docstring) inside ``write`` leaves any previous file
    at ``path`` intact and removes the temporary file.

    Args:
        path: the destination (a symlink is followed: the file it points to is replaced).
        write: called with the temporary path; must create that file.

    Returns:
        ``path`` as given, as a :class:`~pathlib.Path`.
    """
    real = destination(path)
    clean_stale(real)
    tmp = temp_path(real)
    with cleanup_on_termination():
        try:
            write(tmp)
            fsync(tmp)
            os.chmod(tmp, file_mode(real))  # safetensors creates 0600: use what open() gives
            os.replace(tmp, real)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync(real.parent)
    return as_path(path)
