"""``read_metadata``: a checkpoint's metadata, decoded, without loading its tensors."""

import os

from .io import CheckpointError, header_metadata, header_only
from .legacy import has_legacy_keys
from .spec import loads, parse_version


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint, decoded, without loading its tensors.

    v1 files: JSON fields decoded (``format_version`` as an int). Legacy files: the raw
    str → str metadata plus ``"format_version": 0``.

    Raises:
        CheckpointError: the file is not a safetensors file, not a modlora checkpoint (neither
            v1 metadata nor the seed's tensor keys), or a JSON field is malformed.
    """
    raw = header_metadata(path)
    if "format_version" not in raw:
        keys = [k for k in header_only(path) if k != "__metadata__"]
        if not has_legacy_keys(keys):
            raise CheckpointError(
                f"{path}: not a modlora checkpoint (no 'format_version' metadata and no legacy "
                f"tensor keys; keys {sorted(keys)[:5]})"
            )
        return {**raw, "format_version": 0}
    out = {}
    for key, value in raw.items():
        if key in ("modlora_version", "kind", "dtype"):
            out[key] = value
        elif key == "format_version":
            out[key] = parse_version(value, path)
        else:
            out[key] = loads(raw, key, path)
    return out
