"""Offline merge: bake a saved adapter into a saved transformers model folder, shard by shard.

:func:`merge_checkpoint` never builds the model's weights in memory: it reads the adapter file,
plans every target (weight key, stored shape, orientation) from the safetensors headers and a
weightless skeleton of the model (``config.json`` on the meta device, to tell GPT-2 ``Conv1D``
from ``nn.Linear``), checks everything, then rewrites one shard at a time into a temporary folder
that is renamed to ``out_dir`` only at the end. A failure leaves no ``out_dir``.

The adapter file is read by :func:`read_factors`, a small reader over the checkpoint format of
:mod:`modlora.checkpoint` (v1 keys ``<name>.lora_A/.lora_B``, ``<name>.U/.S/.Vh/.delta_s``,
``<name>.A/.B`` and the seed's legacy ``A.<name__with__underscores>`` keys) that returns the
delta factors at ``c`` without a live model.
"""

import json
import shutil
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._types import Coeff
from .checkpoint import read_metadata, weight_fingerprint
from .coefficient import validate_coeff
from .merge import PROBE_ROWS, PROBE_SEED, MergeError, MergeReport, check_merged, merged_weight
from .ranks import check_rank_vector, infer_rank

RECORD_NAME = "modlora_merge.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ROLES = {"lora": ("lora_A", "lora_B"), "pissa": ("U", "S", "Vh", "delta_s"), "history": ("A", "B")}
_LEGACY = {"lora": ("A", "B"), "pissa": ("U", "S", "Vh", "delta_s")}


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


# ---------------------------------------------------------------------------- adapter file
@dataclass(frozen=True)
class AdapterFactors:
    """A saved adapter's delta at one ``c``: ``factors = {target: (A (r, d_in), B (d_out, r))}``."""

    path: Path
    kind: str
    c: float
    factors: dict[str, tuple[Tensor, Tensor]]
    fingerprints: dict[str, str | None]


def read_factors(path, c: Coeff | None = 1.0, names: Iterable[str] | None = None) -> AdapterFactors:
    """Read an adapter file's delta factors at ``c``, float32, without a model.

    Args:
        path: a file written by ``adapter.save`` (or a legacy seed file).
        c: the coefficient folded into ``B``; ``None`` uses the stored deployed ``c``.
        names: module names used to undo the legacy ``__`` flattening (default: ``__`` → ``.``).

    Raises:
        ValueError: unknown kind, unexpected or incomplete tensors, ranks that contradict the
            metadata, non-finite values, no usable ``c``.
    """
    path = Path(path)
    meta = read_metadata(path)
    tensors = load_file(str(path))
    legacy = meta["format_version"] == 0
    kind = meta.get("kind", "lora" if legacy else None)
    roles = (_LEGACY if legacy else _ROLES).get(kind)
    if roles is None:
        raise ValueError(f"{path}: unknown adapter kind {kind!r}")
    if kind == "lora" and not ("r" in meta and "alpha" in meta):
        raise ValueError(f"{path}: a LoRA file needs metadata 'r' and 'alpha' to scale B")
    flat = {n.replace(".", "__"): n for n in names or ()}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if legacy:
            role, _, name = key.partition(".")
            name = flat.get(name, name.replace("__", "."))
        else:
            name, _, role = key.rpartition(".")
        if role not in roles or not name:
            raise ValueError(f"{path}: unexpected tensor {key!r} for a {kind} adapter")
        parts.setdefault(name, {})[role] = tensor
    if c is None:
        c = meta.get("c") if not legacy else None
        if c is None:
            raise ValueError(f"c=None uses the deployed c stored in {path}, but it has none")
    value = validate_coeff(c)
    if not isinstance(value, float):
        raise ValueError("merging needs a scalar c")
    shapes = meta.get("shapes") or {}
    out = {}
    for name, p in parts.items():
        if set(p) != set(roles):
            raise ValueError(f"{path}: target {name!r} has {sorted(p)}, needs {sorted(roles)}")
        if not all(bool(torch.isfinite(t).all()) for t in p.values()):
            raise ValueError(f"{path}: target {name!r} holds non-finite values")
        d_in, d_out, r_meta = shapes.get(name, (None, None, None))
        if kind == "pissa":
            a, b = p["Vh"], p["U"]
            infer_rank(name, a, b, r_meta, d_in=d_in, d_out=d_out, down_label="Vh", up_label="U")
            check_rank_vector(name, "delta_s", p["delta_s"], a.shape[0])
            b, scale = b * p["delta_s"], 1.0  # B = U diag(Δs), in the stored dtype as the hook
        else:
            a, b = p[roles[0]], p[roles[1]]
            if kind == "lora":
                expected = r_meta or (meta.get("rank_pattern") or {}).get(name, int(meta["r"]))
            else:
                expected = r_meta
            labels = {"down_label": roles[0], "up_label": roles[1]}
            rank = infer_rank(name, a, b, expected, d_in=d_in, d_out=d_out, **labels)
            alpha = (meta.get("alpha_pattern") or {}).get(name, meta.get("alpha"))
            scale = float(alpha) / rank if kind == "lora" else 1.0
        out[name] = (a.float(), b.float() * (value * scale))
    if not out:
        raise ValueError(f"{path}: holds no adapter tensors")
    return AdapterFactors(path, kind, value, out, dict(meta.get("fingerprints") or {}))


# ---------------------------------------------------------------------------- model folder
def _weight_files(model_dir: Path) -> tuple[dict[str, str], dict | None]:
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


def _skeleton(model_dir: Path):
    """The model built on the meta device from ``config.json`` (no weights), or ``None``."""
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
class _Plan:
    name: str
    key: str
    shard: str
    transposed: bool
    dtype: torch.dtype


def _plan(model_dir: Path, adapter: AdapterFactors, weight_map: dict, skeleton, config) -> dict:
    """``{target: _Plan}``; every target is checked, the first failure raised listing the rest."""
    modules = dict(skeleton.named_modules()) if skeleton is not None else {}
    tied_out = None
    text_config = config.get_text_config() if config is not None else None
    if skeleton is not None and getattr(text_config, "tie_word_embeddings", False):
        tied_out = skeleton.get_output_embeddings()
    headers: dict[str, dict] = {}
    plans, used, errors = {}, {}, []
    for name, (a, b) in adapter.factors.items():
        try:
            plan = _plan_one(model_dir, name, a, b, weight_map, modules, tied_out, headers)
            if plan.key in used:
                raise MergeError(name, f"maps to {plan.key}, like target {used[plan.key]!r}")
            used[plan.key], plans[name] = name, plan
        except MergeError as err:
            errors.append(err)
    if errors:
        first, rest = errors[0], [str(e) for e in errors[1:]]
        more = f"; {len(rest)} more target(s) fail too: {rest[:3]}" if rest else ""
        raise MergeError(first.target, f"{first.reason}{more}", " (nothing written to out_dir)")
    return plans


def _plan_one(model_dir, name, a, b, weight_map, modules, tied_out, headers) -> _Plan:
    from .layout import _is_conv1d

    d_out, d_in = b.shape[0], a.shape[1]
    try:
        transposed = None
        key_name = name
        if modules:
            key_name = resolve_key(name, modules, "module")
            if tied_out is not None and modules[key_name] is tied_out:
                raise MergeError(name, "its weight is tied to the input embedding")
            transposed = _is_conv1d(modules[key_name])
        key = resolve_key(key_name, weight_map, "weight key", ".weight")
    except KeyError as err:
        raise MergeError(name, f"{err.args[0]} in {model_dir}") from None
    shard = weight_map[key]
    if shard not in headers:
        with safe_open(str(model_dir / shard), "pt") as f:
            headers[shard] = {
                k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                for k in f.keys()  # noqa: SIM118
            }
    shape, dtype = headers[shard][key]
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
    if dtype not in _DTYPES:
        raise MergeError(name, f"{key} is stored as {dtype}, not a float weight (quantized?)")
    return _Plan(name, key, shard, transposed, _DTYPES[dtype])


def _check_base(model_dir: Path, adapter: AdapterFactors, plans: dict, policy: str) -> None:
    differ = []
    for plan in plans.values():
        expected = adapter.fingerprints.get(plan.name)
        if expected is None:
            continue
        with safe_open(str(model_dir / plan.shard), "pt") as f:
            if weight_fingerprint(f.get_tensor(plan.key)) != expected:
                differ.append(plan.name)
    if differ:
        msg = (
            f"{adapter.path} was made on a different base than {model_dir}: {len(differ)} "
            f"target weight(s) differ, e.g. {differ[:3]}"
        )
        if policy == "raise":
            raise ValueError(msg + " (pass check_base='warn' or 'ignore' if intended)")
        logger.warning("{}", msg)


def _merge_one(plan: _Plan, weight: Tensor, a: Tensor, b: Tensor, rtol: float):
    logical = weight.T if plan.transposed else weight  # (d_out, d_in)
    new = merged_weight(logical, a, b)
    if not bool(torch.isfinite(new).all()):
        raise MergeError(plan.name, f"the merged weight {plan.key} is not finite in {weight.dtype}")
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(PROBE_ROWS, logical.shape[1], generator=gen).to(weight.dtype)
    y_base = F.linear(x, logical).float()
    y_merged = F.linear(x, new).float()
    delta = F.linear(F.linear(x.float(), a), b)  # (n, d_out), the hook's math in fp32
    col_norms = torch.linalg.vector_norm(new.float(), dim=0)  # (d_in,)
    result = check_merged(plan.name, y_base, y_merged, delta, col_norms, x, weight.dtype, rtol)
    return (new.T if plan.transposed else new).contiguous(), result


def merge_checkpoint(
    model_dir,
    adapter_path,
    out_dir,
    c: Coeff | None = 1.0,
    *,
    overwrite: bool = False,
    check_base: str | None = None,
    rtol: float = 1e-3,
) -> MergeReport:
    """Write ``model_dir`` with the adapter at ``c`` merged into its weights, to ``out_dir``.

    Args:
        model_dir: a transformers model folder (``model.safetensors`` or sharded with
            ``model.safetensors.index.json``).
        adapter_path: an adapter file written by ``adapter.save``.
        out_dir: the folder to create; it loads with ``from_pretrained`` as a plain model.
        c: the coefficient to bake in; ``None`` uses the adapter's stored deployed ``c``.
        overwrite: replace an existing ``out_dir`` (only after everything succeeded).
        check_base: base-weight fingerprint mismatch: ``"raise"`` (PiSSA default), ``"warn"``
            (LoRA / history default) or ``"ignore"``.
        rtol: verification tolerance (see :func:`modlora.merge.check_merged`).

    Returns:
        A :class:`~modlora.merge.MergeReport`; the same facts go to ``out_dir/modlora_merge.json``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        MergeError: a target has no weight key, the wrong shape, a non-float or tied weight, or
            fails verification. Nothing is written.
        ValueError: a bad adapter file, or (``check_base="raise"``) another base model.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir {model_dir} is not a folder")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("out_dir must differ from model_dir (the base folder is never modified)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if check_base not in (None, "raise", "warn", "ignore"):
        raise ValueError(f"check_base must be 'raise', 'warn' or 'ignore', got {check_base!r}")
    weight_map, _ = _weight_files(model_dir)
    skeleton, config = _skeleton(model_dir)
    names = [n for n, _ in skeleton.named_modules()] if skeleton is not None else None
    adapter = read_factors(adapter_path, c, names)
    plans = _plan(model_dir, adapter, weight_map, skeleton, config)
    _check_base(
        model_dir, adapter, plans, check_base or ("raise" if adapter.kind == "pissa" else "warn")
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    results = {}
    try:
        summary = json.dumps({"adapter": adapter.path.name, "kind": adapter.kind, "c": adapter.c})
        for shard in sorted(set(weight_map.values())):  # one shard in memory at a time
            with safe_open(str(model_dir / shard), "pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            for plan in (p for p in plans.values() if p.shard == shard):
                a, b = adapter.factors[plan.name]
                tensors[plan.key], results[plan.name] = _merge_one(
                    plan, tensors[plan.key], a, b, rtol
                )
            save_file(tensors, str(tmp / shard), metadata={**meta, "modlora_merge": summary})
            del tensors
        previous = None
        for item in sorted(model_dir.iterdir()):
            if item.name == RECORD_NAME:
                previous = json.loads(item.read_text())
            elif item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)  # config, generation config, index, tokenizer
            elif item.is_dir():
                logger.warning("merge_checkpoint: not copying sub-folder {}", item)
        report = _report(adapter, results)
        record = {
            "adapter": str(adapter.path.resolve()),
            "base_model_dir": str(model_dir.resolve()),
            **{k: getattr(report, k) for k in ("kind", "c", "attempted", "applied")},
            "worst_rel_error": report.worst_rel_error,
            "below_resolution": list(report.below_resolution),
            "weights": {p.name: p.key for p in plans.values()},
            "previous": previous,
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _report(adapter: AdapterFactors, results: dict) -> MergeReport:
    nonzero = {n: r for n, (r, _) in results.items() if r > 0}
    worst = max(nonzero, key=nonzero.get) if nonzero else None
    return MergeReport(
        kind=adapter.kind,
        c=adapter.c,
        attempted=len(adapter.factors),
        applied=len(results),
        worst_rel_error=nonzero[worst] if worst else 0.0,
        worst_target=worst,
        below_resolution=tuple(n for n, (_, below) in results.items() if below),
        targets=tuple(results),
    )
