"""Digests: of a file's tensors and metadata (integrity), and of base weights (identity).

Tensor digest (:func:`tensors_digest`): sha256 over every tensor's key, dtype, shape and raw
little-endian bytes, in sorted key order. It does not depend on how safetensors lays the file
out, so it is computed from the tensors at save time and from the file's bytes at load time
(:func:`file_tensors_digest`, no copy), and it names an adapter's delta in memory too
(:func:`adapter_digest`).

Base-weight fingerprints, two methods:

* ``v1`` (:func:`weight_fingerprint`, files written before ``integrity`` existed, and still
  written to the ``fingerprints`` key so the previous release checks new files):
  blake2b-128 over the whole weight up to ``2**22`` elements, else a strided sample plus sums.
  Exact, but a pass over every base weight.
* ``v2`` (:func:`sample_fingerprint`, in ``integrity.base``): sha256 over dtype, shape and
  ``SAMPLE`` elements at fixed pseudo-random positions spread over all rows and columns.
  A fixed, tiny cost per target; any change that moves most weights (a dtype cast, a transpose,
  a fine-tuning step, a merged delta, every weight moved by 1e-3 relative) changes it. An edit
  confined to a few elements can slip between the samples: it is an identity check, not a
  cryptographic guarantee.
"""

import hashlib
from functools import lru_cache

import torch
from torch import Tensor

from .sharding import full_tensor

FULL_HASH_LIMIT = 2**22
SAMPLE_SIZE = 2**20
FINGERPRINT_METHOD = "blake2b-128 v1 (full bytes up to 2**22 elements, else 2**20 strided + sums)"
SAMPLE = 4096
DIGEST = "sha256"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
"""The dtype names safetensors writes, and the torch dtypes they are."""


# ---------------------------------------------------------------------------- tensors
def _update(h, key: str, dtype: str, shape, data) -> None:
    h.update(f"{key}|{dtype}|{list(shape)}|".encode())
    h.update(data)


def dtype_tag(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (what the digest records for a tensor)."""
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous, little-endian), without a copy when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)  # (numel,)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """``"sha256:<hex>"`` of ``{key: tensor}`` (see the module docstring)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        _update(h, key, dtype_tag(t.dtype), t.shape, tensor_bytes(t))
    return f"{DIGEST}:{h.hexdigest()}"


def file_tensors_digest(index: dict[str, dict], data: memoryview) -> str:
    """The same digest from a safetensors header ``index`` and its data section ``data``.

    ``index`` must have been validated (dtype names, shapes, offsets inside ``data``).
    """
    h = hashlib.sha256()
    for key in sorted(index):
        entry = index[key]
        begin, end = entry["data_offsets"]
        _update(
            h, key, dtype_tag(SAFETENSORS_DTYPES[entry["dtype"]]), entry["shape"], data[begin:end]
        )
    return f"{DIGEST}:{h.hexdigest()}"


def _adapter_tensors(adapter) -> dict[str, Tensor] | None:
    tensors = {
        f"{name}.{role}": t
        for name, parts in adapter.target_tensors().items()
        for role, t in parts.items()
    }
    return None if any(t.device.type == "meta" for t in tensors.values()) else tensors


def adapter_digest(adapter) -> str | None:
    """The tensor digest an adapter's file would carry (``<target>.<role>`` keys); ``None``
    while its tensors are on the meta device (no values yet)."""
    tensors = _adapter_tensors(adapter)
    return None if tensors is None else tensors_digest(tensors)


def adapter_probe(adapter) -> str | None:
    """A cheap first comparison of two deltas: the sampled fingerprint of the first target's
    first tensor (equal deltas have equal probes; the digest then decides)."""
    tensors = _adapter_tensors(adapter)
    return None if not tensors else sample_fingerprint(next(iter(tensors.values())))


# ---------------------------------------------------------------------------- base weights
@torch.no_grad()
def weight_fingerprint(weight: Tensor) -> str:
    """The ``v1`` fingerprint (see the module docstring): a 32-character hex digest. An FSDP2
    shard is gathered first (a collective: every rank must call this)."""
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


@lru_cache(maxsize=256)
def _positions(numel: int) -> Tensor:
    """``SAMPLE`` distinct positions in ``[0, numel)``: one per equal segment, jittered within it
    by a multiplicative hash so that rows and columns vary (depends only on ``numel``)."""
    i = torch.arange(SAMPLE, dtype=torch.int64)
    segment = numel // SAMPLE
    return i * segment + (i * 2654435761) % segment  # (SAMPLE,)


@torch.no_grad()
def sample_fingerprint(weight: Tensor) -> str:
    """The ``v2`` fingerprint (see the module docstring): ``"sha256:<hex>"``. An FSDP2 shard is
    gathered first (a collective: every rank must call this)."""
    w = full_tensor(weight.detach())
    flat = w.reshape(-1)  # (numel,)
    if flat.numel() > SAMPLE:
        flat = flat.index_select(0, _positions(flat.numel()).to(flat.device))  # (SAMPLE,)
    h = hashlib.sha256()
    _update(h, "w", dtype_tag(w.dtype), w.shape, tensor_bytes(flat))
    return f"{DIGEST}:{h.hexdigest()}"


FINGERPRINTS = {"v1": weight_fingerprint, "v2": sample_fingerprint}
"""Fingerprint functions by method: a file is checked with the method it was written with."""
