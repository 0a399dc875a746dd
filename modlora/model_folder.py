"""A saved transformers model folder, read without its weights: the plan of an offline merge.

:func:`weight_files` reads the shard index (or the single ``model.safetensors``), every header
checked (:func:`~modlora.checkpoint.io.header_only`), so a broken index, a missing or truncated
shard raises :class:`~modlora.checkpoint.CheckpointError` naming the file. :func:`plan` maps
each adapter target to its weight key, shard, stored shape and orientation (from a weightless
skeleton built from ``config.json`` on the meta device, to tell GPT-2 ``Conv1D`` from
``nn.Linear``), checking everything before anything is written.
"""

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from .checkpoint import AdapterFactors, CheckpointError
from .checkpoint.io import header_only
from .digest import SAFETENSORS_DTYPES
from .layout import is_conv1d
from .merge_check import MergeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = {
    k: v for k, v in SAFETENSORS_DTYPES.items() if v.is_floating_point and v.itemsize >= 2
}


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


def skeleton(model_dir: Path):
    """``(model on the meta device, config)`` from ``config.json`` (no weights), or ``None``s."""
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(model_dir))
        cls = getattr(transformers, (config.architectures or [""])[0])
        with torch.device("meta"):
            return cls(config), config
    except Exception as err:  # custom code, no config...: fall back to shapes
        logger.warning("no model skeleton for {} ({}); orientation from shapes", model_dir, err)
        return None, None


@dataclass(frozen=True)
class Plan:
    """Where target ``name``'s weight is: ``key`` in ``shard``, stored transposed or not."""

    name: str
    key: str
    shard: str
    transposed: bool
    dtype: torch.dtype


def plan(
    model_dir: Path, adapter: AdapterFactors, weight_map: dict, headers: dict, model, config
) -> dict[str, Plan]:
    """``{target: Plan}``; every target is checked, the first failure raised listing the rest."""
    modules = dict(model.named_modules()) if model is not None else {}
    tied_out = None
    text_config = config.get_text_config() if config is not None else None
    if model is not None and getattr(text_config, "tie_word_embeddings", False):
        tied_out = model.get_output_embeddings()
    plans, used, errors = {}, {}, []
    for name, (a, b) in adapter.factors.items():
        try:
            p = _plan_one(model_dir, name, a, b, weight_map, modules, tied_out, headers)
            if p.key in used:
                raise MergeError(name, f"maps to {p.key}, like target {used[p.key]!r}")
            used[p.key], plans[name] = name, p
        except MergeError as err:
            errors.append(err)
    if errors:
        first, rest = errors[0], [str(e) for e in errors[1:]]
        more = f"; {len(rest)} more target(s) fail too: {rest[:3]}" if rest else ""
        raise MergeError(first.target, f"{first.reason}{more}", " (nothing written to out_dir)")
    return plans


def _plan_one(model_dir, name, a, b, weight_map, modules, tied_out, headers) -> Plan:
    d_out, d_in = b.shape[0], a.shape[1]
    try:
        transposed = None
        key_name = name
        if modules:
            key_name = resolve_key(name, modules, "module")
            if tied_out is not None and modules[key_name] is tied_out:
                raise MergeError(name, "its weight is tied to the input embedding")
            transposed = is_conv1d(modules[key_name])
        key = resolve_key(key_name, weight_map, "weight key", ".weight")
    except KeyError as err:
        raise MergeError(name, f"{err.args[0]} in {model_dir}") from None
    shard = weight_map[key]
    entry = headers[shard][key]
    shape, dtype = tuple(entry["shape"]), entry["dtype"]
    if transposed is None:
        if shape == (d_out, d_in) and d_in == d_out:
            raise MergeError(name, f"cannot tell the orientation of square weight {key}")
        transposed = shape == (d_in, d_out)
    want = (d_in, d_out) if transposed else (d_out, d_in)
    if shape != want:
        raise MergeError(
            name,
            f"shape mismatch: {key} is {shape} in {shard}, the adapter needs {want} "
            f"(A {tuple(a.shape)}, B {tuple(b.shape)})",
        )
    if dtype not in FLOAT_DTYPES:
        raise MergeError(name, f"{key} is stored as {dtype}, not a float weight (quantized?)")
    return Plan(name, key, shard, transposed, FLOAT_DTYPES[dtype])
