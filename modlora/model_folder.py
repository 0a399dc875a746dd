"""A saved transformers model folder, read without loading its weights.

:func:`weight_files` maps every tensor key to its shard (``model.safetensors`` or a sharded
``model.safetensors.index.json``); :func:`skeleton_of` builds the model from ``config.json`` on
the meta device (module types and fused expert layouts, no memory); :func:`resolve_key` matches a
module name to a key that may carry or lack a leading prefix.
"""

import json
from collections.abc import Collection
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
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
def weight_files(model_dir: Path) -> tuple[dict[str, str], dict | None]:
    """``({key: shard file name}, index json or None)``."""
    if (model_dir / INDEX_NAME).is_file():
        index = json.loads((model_dir / INDEX_NAME).read_text())
        return dict(index["weight_map"]), index
    if (model_dir / SINGLE_NAME).is_file():
        with safe_open(str(model_dir / SINGLE_NAME), "pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}, None  # noqa: SIM118 (safe_open has no __iter__)
    raise FileNotFoundError(
        f"{model_dir} has no {SINGLE_NAME} or {INDEX_NAME} (only safetensors folders merge; "
        "re-save the model with save_pretrained(safe_serialization=True))"
    )


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
