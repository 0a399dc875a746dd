"""Import a PEFT LoRA folder as a :class:`~modlora.ModulatedLoRA` (see :mod:`modlora.peft`).

The folder is parsed into the same :class:`~modlora.checkpoint.spec.Spec` a checkpoint file is,
then validated and built by the loader's own path
(:func:`~modlora.checkpoint.load.build_adapter`): one validation path for every reader, and a
failure leaves the model as it was. A config that is not JSON, malformed values and unreadable
weights raise :class:`~modlora.checkpoint.CheckpointError` naming the file.
"""

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checks
from .checkpoint import CheckpointError
from .checkpoint.io import as_path, read_file
from .checkpoint.load import build_adapter
from .checkpoint.spec import Spec, kind_config
from .digest import tensors_digest
from .layout import resolve_targets, unwrap_model
from .lora import ModulatedLoRA
from .model_folder import resolve_key
from .peft import _KEY, CONFIG_NAME, PREFIX, WEIGHTS_NAME, pattern_key
from .peft_experts import from_peft, resolve_stem, split_stem

# adapter_config.json keys that never change the delta of a plain LoRA (or are checked apart).
_NEUTRAL = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "target_parameters", "fan_in_fan_out", "init_lora_weights", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "modules_to_save",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "runtime_config",
}  # fmt: skip
# init_lora_weights values that leave the base weights untouched (others rewrite W: PiSSA, ...).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _check_config(config: dict, peft_dir: Path) -> None:
    where = f"{peft_dir / CONFIG_NAME}"
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA imports")
    refuse = {
        "use_dora": "DoRA (a magnitude vector rescales W + ΔW: not a low-rank delta)",
        "lora_bias": "a LoRA bias on B",
        "use_qalora": "QALoRA",
    }
    for key, what in refuse.items():
        if config.get(key):
            raise ValueError(f"{where}: {key}={config[key]!r} — {what} cannot be represented")
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{where}: bias={config['bias']!r} trains the base biases; only bias='none' imports"
        )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights (PiSSA/OLoRA/LoftQ/"
            "CorDA/LoRA-GA: W_res) or selects a LoRA variant; convert it to a plain LoRA in PEFT "
            "first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for key, value in config.items():
        if key not in _NEUTRAL and key not in refuse and key != "bias" and value:
            raise ValueError(
                f"{where}: option {key}={value!r} is a PEFT LoRA variant modlora cannot "
                "represent exactly (only plain LoRA, optionally rsLoRA, imports)"
            )


def _read_config(peft_dir: Path) -> dict:
    path = peft_dir / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{peft_dir} has no {CONFIG_NAME}: not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a PEFT adapter config (not JSON: {err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a PEFT adapter config (not a JSON object)")
    return config


def _load_weights(peft_dir: Path) -> dict[str, Tensor]:
    if (peft_dir / WEIGHTS_NAME).is_file():
        return read_file(peft_dir / WEIGHTS_NAME).tensors
    path = peft_dir / "adapter_model.bin"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable PEFT weights: {err}") from err
        ok = isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values())
        if not ok:
            raise CheckpointError(f"{path}: not a state dict of tensors")
        return state
    raise FileNotFoundError(f"{peft_dir} has no {WEIGHTS_NAME} (nor adapter_model.bin)")


def _base_copy(model: nn.Module, key: str, value: Tensor) -> bool:
    """``key`` is PEFT's copy of a target's own base weight (``<layer>.base_layer.weight``, saved
    when ``lm_head`` or an embedding is a target), equal to the model's: nothing to import."""
    stem = key[len(PREFIX) :] if key.startswith(PREFIX) else ""
    if not stem.endswith(".base_layer.weight"):
        return False
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head too
    try:
        name = resolve_key(stem.removesuffix(".base_layer.weight"), params, suffix=".weight")
    except KeyError:
        return False
    weight = params[name].detach()
    if weight.device.type == "meta" or weight.shape != value.shape:
        return False  # nothing to compare with: refused as an unknown tensor
    return torch.equal(weight.cpu().to(value.dtype), value)


def _pattern(config: dict, key: str, where: Path) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CheckpointError(f"{where}: {key} must map module patterns to values, got {value!r}")
    return value


def import_peft(model: nn.Module, peft_dir, *, dtype: torch.dtype = torch.float32) -> ModulatedLoRA:
    """Read a PEFT LoRA folder as a :class:`~modlora.ModulatedLoRA` on ``model``.

    At ``c = 1`` the adapter reproduces PEFT's output; ``c`` scales the delta. rsLoRA
    (``scaling = alpha / sqrt(r)``) becomes a per-target alpha ``alpha · sqrt(r)``. The folder
    is parsed into the same :class:`~modlora.checkpoint.spec.Spec` a checkpoint file is, and
    validated and built by the loader's own path (:func:`~modlora.checkpoint.load.build_adapter`):
    a failure leaves the model as it was.

    Args:
        model: the plain base model (not a ``PeftModel``).
        peft_dir: a folder written by PEFT's ``save_pretrained`` or :func:`export_peft`.
        dtype: dtype of the imported factors.

    Raises:
        ValueError: a PEFT variant modlora cannot represent exactly (DoRA, LoRA bias, trained
            base biases, ``modules_to_save`` weights, PiSSA/OLoRA/LoftQ/CorDA-initialised
            adapters needing a rewritten base, non-LoRA PEFT types, embeddings, Conv2d...),
            unexpected tensors, a target ``model`` lacks, or shapes that do not fit.
        CheckpointError: (a ``ValueError``) a config that is not JSON or holds malformed
            values, unreadable weights, non-float or non-finite factors.
        FileNotFoundError: missing config or weights.
    """
    peft_dir = as_path(peft_dir, "peft_dir")
    dtype = checks.float_dtype(dtype, "dtype")
    config = _read_config(peft_dir)
    _check_config(config, peft_dir)
    where = peft_dir / CONFIG_NAME
    state = _load_weights(peft_dir)
    factors: dict[str, dict[str, Tensor]] = {}
    odd = []
    model = unwrap_model(model)
    for key, value in state.items():
        match = _KEY.match(key[len(PREFIX) :] if key.startswith(PREFIX) else "")
        if match is None:
            if not _base_copy(model, key, value):
                odd.append(key)
            continue
        factors.setdefault(match["name"], {})[match["role"]] = value
    if odd:
        raise ValueError(
            f"{peft_dir / WEIGHTS_NAME}: tensors a plain LoRA does not have (modules_to_save, "
            f"biases, DoRA magnitudes, embedding LoRA...): {odd[:5]}{'...' if len(odd) > 5 else ''}"
        )
    if not factors:
        raise ValueError(f"{peft_dir / WEIGHTS_NAME} holds no LoRA factors")

    modules = dict(model.named_modules())
    if any(hasattr(m, "base_layer") for m in modules.values()):
        raise ValueError("import_peft needs the plain base model, not a PEFT-wrapped one")
    rank_pattern, alpha_pattern = (
        _pattern(config, k, where) for k in ("rank_pattern", "alpha_pattern")
    )
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{where}: use_rslora must be true or false, got {rslora!r}")
    resolved, missing = {}, []
    parameters = config.get("target_parameters") or []
    for peft_name, pair in sorted(factors.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{peft_dir}: target {peft_name!r} has only {sorted(pair)}")
        wrapped, depth = split_stem(peft_name)  # target_parameters nest ParamWrappers
        try:
            module_name = resolve_key(wrapped, modules, what="module")
        except KeyError as err:
            missing.append(err.args[0])
            continue
        resolved[peft_name] = resolve_stem(module_name, depth, parameters, modules) or module_name
    if missing:
        raise ValueError(
            f"{peft_dir} does not fit this {type(model).__name__}: {len(missing)} target(s) "
            f"missing: {missing[:3]}{'...' if len(missing) > 3 else ''}"
        )
    meta = {
        "r": config.get("r", 8),
        "alpha": config.get("lora_alpha", 8),
        "dropout": config.get("lora_dropout", 0.0),
        "init": "zero",
        "dtype": dtype,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    base = kind_config(ModulatedLoRA, meta, where)  # r, alpha, dropout checked, naming the key
    tensors, targets, ranks, alphas = {}, [], {}, {}
    found = resolve_targets(model, [resolved[n] for n in factors])
    for peft_name, pair in factors.items():
        name = resolved[peft_name]
        t = found[name]
        if t is None:
            owner, _, param = name.rpartition(".")  # a parameter target: name its module
            what = (
                f"a {type(modules[name]).__name__}"
                if name in modules
                else f"parameter {param!r} of a {type(modules.get(owner)).__name__}"
            )
            raise ValueError(
                f"PEFT target {peft_name!r} is {what}; only nn.Linear, Conv1D and fused expert "
                "weights import (a router or other 2-D parameter is not adapted by modlora)"
            )
        bad = [role for role, v in pair.items() if not v.is_floating_point()]
        if bad:
            raise CheckpointError(f"{peft_dir}: target {peft_name!r} has non-float {bad}")
        if t.experts is not None:
            lora_a, lora_b = from_peft(pair["lora_A"], pair["lora_B"], t.experts)
            pair = {"lora_A": lora_a, "lora_B": lora_b}
        key = name if t.experts else peft_name
        key_r, key_a = pattern_key(rank_pattern, key), pattern_key(alpha_pattern, key)
        ranks[name] = rank_pattern[key_r] if key_r is not None else base["r"]
        alpha = alpha_pattern[key_a] if key_a is not None else base["alpha"]
        rank = pair["lora_A"].shape[-2] if pair["lora_A"].dim() >= 2 else 0
        alphas[name] = alpha * math.sqrt(rank) if rslora else alpha  # alpha/sqrt(r) = α'/r
        tensors[name] = {role: pair[role].to(dtype) for role in ("lora_A", "lora_B")}
        targets.append(name)
    alpha_default = base["alpha"] * math.sqrt(base["r"]) if rslora else base["alpha"]
    meta["alpha"] = alpha_default
    meta["rank_pattern"] = {n: k for n, k in ranks.items() if k != base["r"]}
    meta["alpha_pattern"] = {n: a for n, a in alphas.items() if a != alpha_default}
    index = {n: i for i, n in enumerate(modules)}  # model order; a fused weight after its owner
    order = sorted(tensors, key=lambda n: index.get(n, index.get(n.rpartition(".")[0], -1) + 0.5))
    flat = {f"{n}.{role}": t for n in order for role, t in tensors[n].items()}
    spec = Spec(
        path=peft_dir / WEIGHTS_NAME,
        kind=ModulatedLoRA.kind,
        cls=ModulatedLoRA,
        legacy=False,
        config=kind_config(ModulatedLoRA, meta, where),
        tensors={n: tensors[n] for n in order},
        identity=tensors_digest(flat),
        targets=tuple(f"^{re.escape(n)}$" for n in order),
        exclude=(),
        extra_meta={"imported_from_peft": str(peft_dir)},
    )
    with torch.random.fork_rng(devices=[]):  # A's throwaway init must not move the user's RNG
        return build_adapter(model, spec, check_base="ignore")
