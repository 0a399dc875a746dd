"""A saved transformers model folder, read without loading its weights.

:func:`weight_files` maps every tensor key to its shard (``model.safetensors`` or a sharded
``model.safetensors.index.json``), every header checked (a broken index, a missing or truncated
shard raises :class:`~modlora.checkpoint.CheckpointError` naming the file); :func:`skeleton_of` builds the model from ``config.json`` on
the meta device (module types and fused expert layouts, no memory); :func:`resolve_key` matches a
module name to a key that may carry or lack a leading prefix.
"""

import json
from collections.abc import Collection
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open
from torch import Tensor

from .checkpoint import CheckpointError
from .checkpoint.io import header_only

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RECORD_NAME = "modlora_merge.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")


def resolve_key(name: str, available: Collection[str], what: str = "key", suffix: str = "") -> str:
    """Find ``name + suffix`` in ``available``, allowing a missing or extra leading prefix.

    The exact key wins; otherwise the one key that ends with ``"." + name + suffix`` or that
    ``name + suffix`` ends with (``model.layers.0.q_proj`` ↔ ``layers.0.q_proj``).

    Raises:
        KeyError: no key, or several, match (the candidates are listed).
    """
    full = name + suffix
    if full in available:
        return full
    hits = [k for k in available if k.endswith("." + full) or full.endswith("." + k)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise KeyError(f"{what} for {name!r} is ambiguous: {sorted(hits)[:5]}")
    raise KeyError(f"no {what} {full!r} (nor one differing only by a prefix such as 'model.')")


# ---------------------------------------------------------------------------- model folder
def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a shard index (not JSON: {err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    ok = isinstance(weight_map, dict) and all(
        isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
        for k, v in weight_map.items()
    )
    if not ok or not weight_map:
        raise CheckpointError(
            f"{path}: not a shard index (needs a non-empty 'weight_map' of weight key -> shard "
            "file name in this folder)"
        )
    return dict(weight_map)


def weight_files(model_dir: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """``({weight key: shard file name}, {shard: checked header})`` of a model folder.

    Every shard's header is checked (:func:`~modlora.checkpoint.io.header_only`), so a broken
    index, a missing or truncated shard raises naming the file before anything is planned.

    Raises:
        FileNotFoundError: no safetensors weights in the folder, or a shard the index names.
        CheckpointError: a malformed index, or a shard that is not a readable safetensors file
            or lacks a key the index puts in it.
    """
    if (model_dir / INDEX_NAME).is_file():
        weight_map = _read_index(model_dir / INDEX_NAME)
    elif (model_dir / SINGLE_NAME).is_file():
        weight_map = None
    else:
        raise FileNotFoundError(
            f"{model_dir} has no {SINGLE_NAME} or {INDEX_NAME} (only safetensors folders merge; "
            "re-save the model with save_pretrained(safe_serialization=True))"
        )
    shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
    headers = {}
    for shard in shards:
        if not (model_dir / shard).is_file():
            raise FileNotFoundError(
                f"{model_dir / INDEX_NAME} names shard {shard}, which is missing"
            )
        header = header_only(model_dir / shard)
        headers[shard] = {k: v for k, v in header.items() if k != "__metadata__"}
    if weight_map is None:
        weight_map = {k: SINGLE_NAME for k in headers[SINGLE_NAME]}
    absent = [k for k, shard in weight_map.items() if k not in headers[shard]]
    if absent:
        raise CheckpointError(
            f"{model_dir / INDEX_NAME} puts {absent[:3]} in shards that do not hold them"
        )
    return weight_map, headers


def skeleton_of(model_dir: Path):
    """The model built on the meta device from ``config.json`` (no weights), or ``None``.

    The class is the config's ``architectures[0]``; a config that names none gets what
    ``AutoModelForCausalLM`` (then ``AutoModel``) builds for it.
    """
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(model_dir))
        if config.architectures:  # a named class transformers lacks (custom code): no guess
            named = getattr(transformers, config.architectures[0])
            with torch.device("meta"):
                return named(config), config
        with torch.device("meta"):
            for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
                try:
                    return auto.from_config(config), config
                except ValueError:
                    continue
        raise ValueError(f"no transformers class builds a {type(config).__name__}")
    except Exception as err:  # custom code, no config...: fall back to shapes
        logger.warning("no model skeleton for {} ({}); orientation from shapes", model_dir, err)
        return None, None


def shard_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of one shard; unreadable data raises naming the shard."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors shard: {err}") from err


def merged_before(model_dir: Path, identity: str) -> str | None:
    """The merge record of ``model_dir`` (and the folders it was merged from) that already
    holds the delta ``identity``, if any."""
    record_path = model_dir / RECORD_NAME
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{record_path}: unreadable merge record (not JSON)") from None
    while isinstance(record, dict):
        if record.get("adapter_digest") == identity:
            return str(record.get("adapter"))
        record = record.get("previous")
    return None
