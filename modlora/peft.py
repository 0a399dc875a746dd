"""Speak PEFT's LoRA format: :func:`export_peft` writes any adapter at a fixed ``c``;
:func:`~modlora.peft_import.import_peft` reads a PEFT LoRA folder back as a
:class:`~modlora.ModulatedLoRA`.

PEFT's LoRA layout: ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight``
``(r, d_in)`` and ``...lora_B.weight`` ``(d_out, r)`` — the logical orientation, also for GPT-2
``Conv1D`` (``fan_in_fan_out`` only flips PEFT's *merge*, not these shapes) — and
``adapter_config.json`` where the delta is ``scaling · B @ A`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under rsLoRA), per target through ``rank_pattern`` / ``alpha_pattern``.
PEFT matches a pattern key against a module name with ``re.match(rf"(.*\\.)?({key})$", name)``;
modlora writes full module names and checks that each resolves to its own target.

Export folds ``c`` into ``B``; a LoRA keeps its ``r`` and ``alpha``; PiSSA becomes the exact
rank-r LoRA ``B = U · diag(c · Δs)``, ``A = Vh`` with ``lora_alpha = r``; a history its
concatenated factors with ``lora_alpha = Σr``.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import save_file
from torch import Tensor

from ._types import Coeff
from .adapter import LowRankAdapter
from .checkpoint import write_folder
from .peft_experts import key_stems, to_peft

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<name>.+)\.(?P<role>lora_A|lora_B)\.weight$")


def pattern_key(keys, name: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key PEFT uses for module ``name`` (or ``None``)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    adapter: LowRankAdapter, out_dir, c: Coeff | None = 1.0, *, overwrite: bool = False
) -> Path:
    """Write ``adapter`` at coefficient ``c`` as a PEFT LoRA folder.

    Args:
        adapter: any modlora adapter (LoRA, PiSSA, HistoryBake).
        out_dir: the folder to create (``adapter_config.json`` + ``adapter_model.safetensors``).
        c: the coefficient folded into ``B``; ``None`` uses the adapter's ``deployed_c``.
        overwrite: replace an existing ``out_dir`` that an earlier export wrote (a folder
            holding anything else is never replaced; the old one stays until the new is whole).

    Returns:
        ``out_dir`` as a ``Path``. ``PeftModel.from_pretrained(base, out_dir)`` then gives the
        hooked model at ``c``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or was not written by
            an earlier export (or holds other files too).
        ValueError: no usable ``c``; module names PEFT's pattern matching would confuse;
            ``out_dir`` is (or contains) the working directory.
    """
    if not isinstance(adapter, LowRankAdapter):
        raise TypeError(f"export_peft needs a modlora adapter, got {type(adapter).__name__}")
    value = adapter.scalar_c(c, "export_peft")

    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    stems = key_stems(adapter.layout)  # fused expert weights: PEFT's target_parameters keys
    with torch.no_grad():
        for name, part in adapter.named_parts():
            a, b, scale = part.checked_factors()
            rank = a.shape[-2]
            ranks[name] = rank
            alphas[name] = float(f"{scale * rank:.12g}")  # PEFT's scaling = alpha / r
            a, b = a.detach().float(), b.detach().float() * value  # c folded into B
            if name in stems:
                a, b = to_peft(a, b)
            stem = stems.get(name, f"{name}.")
            tensors[f"{PREFIX}{stem}lora_A.weight"] = a.cpu().contiguous()
            tensors[f"{PREFIX}{stem}lora_B.weight"] = b.cpu().contiguous()
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {n: k for n, k in ranks.items() if k != r}
    alpha_pattern = {n: _number(a) for n, a in alphas.items() if a != alpha}
    for pattern in (rank_pattern, alpha_pattern):
        for name in adapter.layout.names:
            key = pattern_key(pattern, name)
            if key is not None and key != name:
                raise ValueError(
                    f"PEFT would match pattern key {key!r} to module {name!r}; these module "
                    "names cannot carry per-target ranks/alphas in PEFT's format"
                )
    model_config = getattr(adapter.model, "config", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": getattr(adapter, "dropout_p", 0.0),
        "target_modules": [n for n in adapter.layout.names if n not in stems],
        "target_parameters": list(stems) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(t.transposed for t in adapter.layout if t.param is None),
        "init_lora_weights": True,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    dropped = _peft_would_drop(adapter.model, config)
    if dropped:
        logger.warning(
            "export_peft: PEFT reads target_modules {} of this {} as transformers-v4 expert "
            "names and moves them onto the fused experts when it loads the folder, so real PEFT "
            "will not reproduce the hooked model (import_peft reads the folder as written); "
            "exclude those layers to export for PEFT",
            dropped[:4],
            type(adapter.model).__name__,
        )
    meta = {"format": "pt", "modlora_kind": adapter.kind, "modlora_c": repr(value)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return write_folder(
        out_dir,
        write,
        overwrite,
        writer="export_peft",
        legacy=lambda files: files <= {CONFIG_NAME, WEIGHTS_NAME, "README.md"},
    )


def _peft_would_drop(model, config: dict) -> list[str]:
    """The ``target_modules`` PEFT's own transformers-v5 conversion takes out of ``config`` when
    it loads it onto ``model`` (empty when PEFT is not installed or leaves the config alone)."""
    if not config["target_modules"]:
        return []
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
        )

        probe = LoraConfig(
            r=config["r"],
            target_modules=list(config["target_modules"]),
            target_parameters=list(config["target_parameters"] or []),
        )
        convert_peft_config_for_transformers(probe, model, conversions=None)
    except Exception:  # no PEFT, another PEFT version, or a model PEFT cannot convert
        return []
    kept = set(probe.target_modules or [])
    return [name for name in config["target_modules"] if name not in kept]
