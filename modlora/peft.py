"""Speak PEFT's LoRA format: :func:`export_peft` writes any adapter at a fixed ``c``,
:func:`import_peft` reads a PEFT LoRA folder back as a :class:`~modlora.ModulatedLoRA`.

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
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._types import Coeff
from .adapter import LowRankAdapter
from .checkpoint import write_folder
from .layout import resolve_target, unwrap_model
from .lora import ModulatedLoRA
from .model_folder import resolve_key
from .peft_experts import from_peft, key_stems, resolve_stem, split_stem, to_peft
from .ranks import infer_rank

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<name>.+)\.(?P<role>lora_A|lora_B)\.weight$")

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
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` as a ``Path``. ``PeftModel.from_pretrained(base, out_dir)`` then gives the
        hooked model at ``c``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError: no usable ``c``; module names PEFT's pattern matching would confuse.
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
    meta = {"format": "pt", "modlora_kind": adapter.kind, "modlora_c": repr(value)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return write_folder(out_dir, write, overwrite)


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


def _load_weights(peft_dir: Path) -> dict[str, Tensor]:
    if (peft_dir / WEIGHTS_NAME).is_file():
        return load_file(str(peft_dir / WEIGHTS_NAME))
    if (peft_dir / "adapter_model.bin").is_file():
        return torch.load(peft_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{peft_dir} has no {WEIGHTS_NAME} (nor adapter_model.bin)")


def import_peft(model: nn.Module, peft_dir, *, dtype: torch.dtype = torch.float32) -> ModulatedLoRA:
    """Read a PEFT LoRA folder as a :class:`~modlora.ModulatedLoRA` on ``model``.

    At ``c = 1`` the adapter reproduces PEFT's output; ``c`` scales the delta. rsLoRA
    (``scaling = alpha / sqrt(r)``) becomes a per-target alpha ``alpha · sqrt(r)``.

    Args:
        model: the plain base model (not a ``PeftModel``).
        peft_dir: a folder written by PEFT's ``save_pretrained`` or :func:`export_peft`.
        dtype: dtype of the imported factors.

    Raises:
        ValueError: a PEFT variant modlora cannot represent exactly (DoRA, LoRA bias, trained
            base biases, ``modules_to_save`` weights, PiSSA/OLoRA/LoftQ/CorDA-initialised
            adapters needing a rewritten base, non-LoRA PEFT types, embeddings, Conv2d...),
            unexpected tensors, a target ``model`` lacks, or shapes that do not fit.
        FileNotFoundError: missing config or weights.
    """
    peft_dir = Path(peft_dir)
    if not (peft_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{peft_dir} has no {CONFIG_NAME}: not a PEFT adapter folder")
    config = json.loads((peft_dir / CONFIG_NAME).read_text())
    _check_config(config, peft_dir)
    state = _load_weights(peft_dir)
    factors: dict[str, dict[str, Tensor]] = {}
    odd = []
    for key, value in state.items():
        match = _KEY.match(key[len(PREFIX) :] if key.startswith(PREFIX) else "")
        if match is None:
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

    model = unwrap_model(model)
    modules = dict(model.named_modules())
    if any(hasattr(m, "base_layer") for m in modules.values()):
        raise ValueError("import_peft needs the plain base model, not a PEFT-wrapped one")
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    resolved, missing = {}, []
    parameters = config.get("target_parameters") or []
    for peft_name, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{peft_dir}: target {peft_name!r} has only {sorted(pair)}")
        wrapped, depth = split_stem(peft_name)  # target_parameters nest ParamWrappers
        try:
            module_name = resolve_key(wrapped, modules, what="module")
        except KeyError as err:
            missing.append(err.args[0])
            continue
        fused = resolve_stem(module_name, depth, parameters, modules)
        resolved[peft_name] = fused or module_name
    if missing:
        raise ValueError(
            f"{peft_dir} does not fit this {type(model).__name__}: {len(missing)} target(s) "
            f"missing: {missing[:3]}{'...' if len(missing) > 3 else ''}"
        )
    names, ranks, alphas, loaded = [], {}, {}, {}
    for peft_name, pair in factors.items():
        name = resolved[peft_name]
        t = resolve_target(model, name)
        if t is None:
            raise ValueError(
                f"PEFT target {peft_name!r} is a {type(modules[name]).__name__}; only nn.Linear, "
                "Conv1D and fused expert weights import"
            )
        if t.experts is not None:
            lora_a, lora_b = from_peft(pair["lora_A"], pair["lora_B"], t.experts)
            pair = {"lora_A": lora_a, "lora_B": lora_b}
        key_r = pattern_key(rank_pattern, name if t.experts else peft_name)
        key_a = pattern_key(alpha_pattern, name if t.experts else peft_name)
        rank = infer_rank(
            peft_name,
            pair["lora_A"],
            pair["lora_B"],
            expected=int(rank_pattern[key_r]) if key_r is not None else r0,
            d_in=t.d_in,
            d_out=t.d_out,
            down_label="lora_A",
            up_label="lora_B",
        )
        alpha = float(alpha_pattern[key_a]) if key_a is not None else alpha0
        names.append(name)
        ranks[name] = rank
        alphas[name] = alpha * math.sqrt(rank) if rslora else alpha  # alpha/sqrt(r) = α'/r
        loaded[name] = {role: pair[role].to(dtype) for role in ("lora_A", "lora_B")}
        bad = [role for role, t in loaded[name].items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"{peft_dir}: target {peft_name!r} holds non-finite values in {bad}")
    alpha_default = alpha0 * math.sqrt(r0) if rslora else alpha0
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):  # A's throwaway init must not move the user's RNG
        lora = ModulatedLoRA(
            model,
            r=r0,
            alpha=alpha_default,
            targets=[f"^{re.escape(n)}$" for n in names],
            exclude=(),
            dropout=float(config.get("lora_dropout", 0.0)),
            dtype=dtype,
            rank_pattern={n: k for n, k in ranks.items() if k != r0},
            alpha_pattern={n: a for n, a in alphas.items() if a != alpha_default},
        )
    try:
        lora.load_target_tensors(loaded)
    except BaseException:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        raise
    lora.extra_meta = {"imported_from_peft": str(peft_dir)}
    return lora.eval()
