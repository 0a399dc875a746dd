"""Reading checkpoint files safely: the header checked field by field, then the integrity digests.

Every reader (load, offline merge, resume, ``read_metadata``) goes through :func:`read_file` or
:func:`header_metadata`, so a truncated, foreign or corrupted file raises
:class:`CheckpointError` naming the file and what is wrong, never a bare ``TypeError`` from a
malformed offset or a ``SafetensorError`` without a path.

Integrity (format v1, optional key ``integrity``, JSON): ``{"tensors": <digest of the tensors>,
"metadata": <digest of every other metadata key>, "base_method": "v2", "base": {target:
fingerprint}}``. A file that carries it is checked on every read; files written before it
existed load as before (their tensors are unchecked).
"""

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
from torch import Tensor

from ..digest import DIGEST, SAFETENSORS_DTYPES, file_tensors_digest

MAX_HEADER = 100 * 2**20
INTEGRITY = "integrity"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is malformed, or does not fit the model it is loaded onto."""


def as_path(path, what: str = "path") -> Path:
    """``path`` (a ``str`` or ``os.PathLike``) as a :class:`~pathlib.Path`, a leading ``~``
    expanded to the user's home (as a shell does); ``TypeError`` else."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path).expanduser()


@dataclass
class StoredFile:
    """A checkpoint file read and checked: ``identity`` is its tensor digest (not the metadata)."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, Tensor]
    identity: str
    integrity: dict | None = None


# ---------------------------------------------------------------------------- header
def _bad(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a safetensors file ({what})")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(path, key: str, entry, size: int) -> None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(
            path, f"header entry {key!r} is not {{dtype, shape, data_offsets}}: {entry!r:.200}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _bad(path, f"tensor {key!r} has unsupported dtype {dtype!r:.50}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _bad(path, f"tensor {key!r} has a malformed shape {shape!r:.100}")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
    if not ok or offsets[0] > offsets[1]:
        raise _bad(path, f"tensor {key!r} has malformed data_offsets {offsets!r:.100}")
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"tensor {key!r}: {dtype} {shape} needs {nbytes} bytes, offsets {offsets}")
    if offsets[1] > size:
        raise CheckpointError(
            f"{path}: truncated (tensor {key!r} ends at byte {offsets[1]} of the data section, "
            f"which has {size} bytes)"
        )


def read_header(path: Path, data: bytes | memoryview, size: int | None = None) -> tuple[dict, int]:
    """``(header, data start)`` of a safetensors file, every field checked.

    Args:
        path: for messages.
        data: the file's bytes (at least the length prefix and the header).
        size: the file's length (default ``len(data)``), to check tensor offsets against.
    """
    size = len(data) if size is None else size
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > min(size - 8, MAX_HEADER) or n > len(data) - 8:
        raise CheckpointError(
            f"{path}: truncated or not a safetensors file (header claims {n} bytes, file has "
            f"{size - 8} after the length prefix)"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _bad(path, f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _bad(path, "__metadata__ is not a str -> str object")
    start = 8 + n
    spans = []
    for key, entry in header.items():
        if key != "__metadata__":
            _check_entry(path, key, entry, size - start)
            spans.append(tuple(entry["data_offsets"]))
    spans.sort()
    if any(b0 < a1 for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False)):
        raise _bad(path, "tensors overlap in the data section")
    return header, start


# ---------------------------------------------------------------------------- integrity
def metadata_digest(metadata: dict[str, str], integrity: dict) -> str:
    """Digest of every metadata key but ``integrity``, plus ``integrity`` without this digest."""
    body = {k: v for k, v in metadata.items() if k != INTEGRITY}
    body[INTEGRITY] = {k: v for k, v in integrity.items() if k != "metadata"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return f"{DIGEST}:{hashlib.sha256(text.encode()).hexdigest()}"


def read_integrity(path, metadata: dict[str, str]) -> dict | None:
    """The parsed ``integrity`` entry (``None`` in files written before it), metadata checked."""
    if INTEGRITY not in metadata:
        return None
    try:
        integrity = json.loads(metadata[INTEGRITY])
    except (json.JSONDecodeError, RecursionError):
        integrity = None
    ok = isinstance(integrity, dict) and all(
        isinstance(integrity.get(k), str) for k in ("tensors", "metadata")
    )
    if not ok:
        raise CheckpointError(f"{path}: metadata 'integrity' is malformed")
    if metadata_digest(metadata, integrity) != integrity["metadata"]:
        raise CheckpointError(
            f"{path}: the metadata does not match the checksum stored in the file: the file is "
            "corrupted or was edited after it was written"
        )
    return integrity


# ---------------------------------------------------------------------------- read
def read_file(path) -> StoredFile:
    """Read a checkpoint: header checked, tensors loaded, integrity digests verified.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: truncated, malformed, or not matching its own checksums.
    """
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    header, start = read_header(path, data)
    metadata = dict(header.get("__metadata__") or {})
    integrity = read_integrity(path, metadata)
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    identity = file_tensors_digest(index, memoryview(data)[start:])
    if integrity is not None and identity != integrity["tensors"]:
        raise CheckpointError(
            f"{path}: the tensor bytes do not match the checksum stored in the file: the file "
            "is corrupted or was edited after it was written"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
    return StoredFile(path, metadata, tensors, identity, integrity)


def legacy_identity(path) -> str:
    """The tensor digest training states saved before format ``integrity`` recorded (blake2b
    over the JSON tensor index and the data section)."""
    path = as_path(path)
    data = path.read_bytes()
    header, start = read_header(path, data)
    index = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(index, sort_keys=True).encode())
    h.update(memoryview(data)[start:])
    return h.hexdigest()


def header_only(path) -> dict:
    """The checked header of a safetensors file, read without its tensor data."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        data = prefix + f.read(min(n, MAX_HEADER))
    return read_header(path, data, size)[0]


def header_metadata(path) -> dict[str, str]:
    """The str → str metadata of a checkpoint, read from its header alone (metadata checksum
    verified when the file has one)."""
    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    metadata = dict(header_only(path).get("__metadata__") or {})
    read_integrity(path, metadata)
    return metadata
