"""Checkpoint file plumbing: base-weight fingerprints, the one atomic writer, safe reads.

Base-weight fingerprint (:func:`weight_fingerprint`): blake2b-128 over dtype, shape and the raw
bytes of the stored weight when it has at most ``2**22`` elements; above that, over a strided
sample of ``2**20`` elements plus the float64 sum and sum of squares of the whole tensor (one
pass, no full CPU copy). Any dtype cast, transpose or fine-tuning step changes it; it is not a
cryptographic guarantee on huge layers, only a cheap, sensitive identity check.

Reading checks the length prefix and the header before handing the bytes to safetensors, so a
truncated or foreign file raises :class:`CheckpointError` naming what is wrong.
"""

import hashlib
import json
import os
import secrets
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from ..sharding import full_tensor

FULL_HASH_LIMIT = 2**22
SAMPLE_SIZE = 2**20
FINGERPRINT_METHOD = "blake2b-128 v1 (full bytes up to 2**22 elements, else 2**20 strided + sums)"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is malformed, or does not fit the model it is loaded onto."""


# ---------------------------------------------------------------------------- fingerprint
@torch.no_grad()
def weight_fingerprint(weight: Tensor) -> str:
    """A cheap, sensitive identity of a base weight (see the module docstring).

    Args:
        weight: the layer's stored weight (any dtype, any device, as stored: no transpose); an
            FSDP2 shard is gathered first (a collective: every rank must call this).

    Returns:
        A 32-character hex digest.
    """
    w = full_tensor(weight.detach())
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{w.dtype}|{tuple(w.shape)}".encode())
    flat = w.reshape(-1)  # (numel,)
    if flat.numel() > FULL_HASH_LIMIT:
        stride = flat.numel() // SAMPLE_SIZE
        sums = torch.zeros(2, dtype=torch.float64)
        for chunk in flat.split(FULL_HASH_LIMIT):
            c64 = chunk.double()
            sums += torch.stack([c64.sum(), c64.square().sum()]).cpu()
        h.update(sums.numpy().tobytes())
        flat = flat[::stride]  # (~SAMPLE_SIZE,)
    h.update(flat.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


# ---------------------------------------------------------------------------- atomic write
def check_destination(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    return path


def _file_mode(path: Path) -> int:
    """The permissions a new file at ``path`` would get (an existing file keeps its own)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(temp)`` in the same folder, fsync, then rename.

    A crash or exception inside ``write`` leaves any previous file at ``path`` intact and
    removes the temporary file.

    Args:
        path: the destination.
        write: called with the temporary path; must create that file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = check_destination(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # safetensors creates 0600; use what a plain open() gives
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass
    return path


def write_folder(
    out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool
) -> Path:
    """Create the folder ``out_dir`` atomically: ``write(temp)`` fills a fresh folder beside it,
    which is renamed to ``out_dir`` only once complete (a failure leaves no ``out_dir``).

    Args:
        out_dir: the folder to create.
        write: called with the temporary folder; must fill it.
        overwrite: replace an existing ``out_dir`` (only after ``write`` succeeded).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------- read
@dataclass
class StoredFile:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, Tensor]
    identity: str  # digest of the tensor index and data (not the metadata)


def read_header(path: Path, data: bytes) -> tuple[dict, int]:
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(
            f"{path}: truncated or not a safetensors file (header claims {n} bytes, "
            f"file has {len(data) - 8} after the length prefix)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path}: not a safetensors file (header is not JSON: {err})"
        ) from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def read_file(path: str | os.PathLike) -> StoredFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    header, start = read_header(path, data)
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if start + max(ends, default=0) > len(data):
        raise CheckpointError(
            f"{path}: truncated (tensor data ends at byte {start + max(ends)}, "
            f"file has {len(data)} bytes)"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
    metadata = header.get("__metadata__") or {}
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(index, sort_keys=True).encode())
    h.update(memoryview(data)[start:])
    return StoredFile(path, dict(metadata), tensors, h.hexdigest())


def header_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        data = prefix + f.read(min(n, 100 * 2**20))
    header, _ = read_header(path, data)
    return dict(header.get("__metadata__") or {})
