"""Writing files and folders so that no failure destroys what was there.

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

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from .._version import __version__
from .io import as_path

MANIFEST = ".modlora-manifest.json"
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
def _cleanup_on_termination() -> Iterator[None]:
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


def _file_mode(path: Path) -> int:
    """The permissions a new file at ``path`` would get (an existing file keeps its own)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path) -> None:
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
    with _cleanup_on_termination():
        try:
            write(tmp)
            _fsync(tmp)
            os.chmod(tmp, _file_mode(real))  # safetensors creates 0600: use what open() gives
            os.replace(tmp, real)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync(real.parent)
    return as_path(path)


# ---------------------------------------------------------------------------- folders
def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def _check_owned(folder: Path, legacy: Callable[[set[str]], bool] | None) -> None:
    """Refuse to replace a folder modlora did not write (or that holds files it did not write)."""
    present = _files(folder)
    if not present:
        return
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed = set(json.loads(manifest.read_text())["files"])
        except (ValueError, KeyError, TypeError) as err:
            raise FileExistsError(
                f"{folder}: unreadable {MANIFEST} ({err}); not replacing it"
            ) from None
        extra = sorted(present - listed - {MANIFEST})
        if extra:
            raise FileExistsError(
                f"{folder} holds files modlora did not write there ({extra[:5]}); not replacing "
                "it: move them, or choose another output folder"
            )
        return
    if legacy is not None and legacy(present):
        return
    raise FileExistsError(
        f"{folder} was not written by modlora (no {MANIFEST}); not replacing it: remove it "
        "yourself, or choose another output folder"
    )


def _check_overlap(real: Path, protect: Iterable) -> None:
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"output folder {real} is (or contains) the current working directory")
    for item in protect:
        other = Path(os.path.realpath(item))
        if real == other or real in other.parents or other in real.parents:
            raise ValueError(
                f"output folder {real} overlaps the input {other}: it must be neither of them, "
                "nor inside one, nor contain one"
            )


@lru_cache(maxsize=1)
def _renameat2():
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where
    the platform or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, real: Path) -> Path | None:
    """Put the complete folder ``tmp`` at ``real``; returns where the old folder now is."""
    if not os.path.lexists(real):
        os.rename(tmp, real)
        return None
    if exchange(tmp, real):
        return tmp
    old = temp_path(real)
    os.rename(real, old)
    try:
        os.rename(tmp, real)
    except BaseException:
        os.rename(old, real)
        raise
    return old


def write_folder(
    out_dir,
    write: Callable[[Path], None],
    overwrite: bool,
    *,
    writer: str,
    protect: Iterable = (),
    legacy: Callable[[set[str]], bool] | None = None,
) -> Path:
    """Create the folder ``out_dir``: ``write(temp)`` fills a fresh folder beside it, which is
    swapped in only once complete, with a manifest of what it holds.

    Args:
        out_dir: the folder to create (a symlink is followed).
        write: called with the temporary folder; must fill it.
        overwrite: replace an existing ``out_dir`` that modlora wrote (see the module docstring).
        writer: what writes the folder (recorded in the manifest).
        protect: inputs ``out_dir`` may not be, contain, or lie inside.
        legacy: for folders written before manifests: says whether a file set is this writer's.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it was not written by
            modlora (or holds other files too).
        ValueError: ``out_dir`` overlaps an input or the working directory.
    """
    out_dir = as_path(out_dir, "out_dir")
    real = Path(os.path.realpath(out_dir))
    _check_overlap(real, protect)
    if real.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
        if not real.is_dir():
            raise FileExistsError(f"{out_dir} is a file, not a folder modlora wrote")
        _check_owned(real, legacy)
    real.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(real)
    tmp = temp_path(real)
    with _cleanup_on_termination():
        try:
            tmp.mkdir()
            write(tmp)
            files = sorted(_files(tmp))
            manifest = {"writer": writer, "modlora_version": __version__, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for name in [*files, MANIFEST]:
                _fsync(tmp / name)
            _fsync(tmp)
            old = _swap_in(tmp, real)
            tmp = old
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    _fsync(real.parent)
    return out_dir
