"""Building edited checkpoint files for tests: copies with metadata or tensors changed.

An edited copy is *resealed* by default: its ``integrity`` entry is recomputed, so the file is
what a (buggy or hostile) writer could have produced and the reader's validation, not the
checksum, has to catch what is wrong. ``reseal=False`` keeps the old checksums (corruption).
"""

import json

import safetensors.torch
from safetensors import safe_open

from modlora.checkpoint.io import INTEGRITY, metadata_digest
from modlora.digest import tensors_digest


def sealed(metadata: dict, tensors: dict) -> dict:
    """``metadata`` with its ``integrity`` entry recomputed for ``tensors`` (if it has one)."""
    if INTEGRITY not in metadata:
        return metadata
    try:
        integrity = json.loads(metadata[INTEGRITY])
    except json.JSONDecodeError:
        return metadata
    if not isinstance(integrity, dict):
        return metadata
    integrity["tensors"] = tensors_digest(tensors)
    integrity["metadata"] = metadata_digest(metadata, integrity)
    return {**metadata, INTEGRITY: json.dumps(integrity, ensure_ascii=False)}


def rewrite(src, dst, meta=None, tensors=None, drop=(), reseal=True):
    """Copy a checkpoint with some metadata / tensors replaced (to build bad files)."""
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata() or {})
    data = safetensors.torch.load_file(str(src))
    metadata.update(meta or {})
    data.update(tensors or {})
    for key in drop:
        metadata.pop(key, None)
        data.pop(key, None)
    if reseal:
        metadata = sealed(metadata, data)
    safetensors.torch.save_file(data, str(dst), metadata=metadata)
    return dst


def claiming_rank(src, dst, name: str, r: int):
    """Copy a checkpoint whose ``shapes`` metadata claims rank ``r`` for target ``name`` while
    its tensors keep their own rank (resealed: as a writer could have made it)."""
    with safe_open(str(src), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    shapes[name][2] = r  # [d_in, d_out, r]
    return rewrite(src, dst, meta={"shapes": json.dumps(shapes)})
