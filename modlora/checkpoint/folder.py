"""Writing a folder whole: built beside its destination, swapped in when complete.

A folder is replaced only if modlora wrote it: it holds a manifest (``.modlora-manifest.json``)
listing its files and nothing else, or is empty (``legacy`` lets a writer recognise its folders
from before manifests). It may not overlap the inputs or the working directory. The swap is
``renameat2(RENAME_EXCHANGE)`` on Linux (both names always exist); elsewhere two renames (a
crash between them leaves the old folder under a temporary name, removed by the next write).
Temporary folders are cleaned as :mod:`.write` cleans temporary files.
"""

import ctypes
import errno
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from .._version import __version__
from .io import as_path
from .write import clean_stale, cleanup_on_termination, fsync, new_file_mode, temp_path

MANIFEST = ".modlora-manifest.json"


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
    with cleanup_on_termination():
        try:
            tmp.mkdir()
            write(tmp)
            files = sorted(_files(tmp))
            manifest = {"writer": writer, "modlora_version": __version__, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for name in [*files, MANIFEST]:
                os.chmod(tmp / name, new_file_mode())  # safetensors writes 0600
                fsync(tmp / name)
            fsync(tmp)
            old = _swap_in(tmp, real)
            tmp = old
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    fsync(real.parent)
    return out_dir
