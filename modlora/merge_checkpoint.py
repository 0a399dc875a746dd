"""Offline merge: bake a saved adapter into a saved transformers model folder, shard by shard.

:func:`merge_checkpoint` never builds the model's weights in memory: it reads the adapter file,
plans every target (weight key, stored shape, orientation) from the safetensors headers and a
weightless skeleton of the model (``config.json`` on the meta device, to tell GPT-2 ``Conv1D``
from ``nn.Linear``), checks everything, then rewrites one shard at a time into a temporary folder
that is swapped in for ``out_dir`` only at the end (:func:`~modlora.checkpoint.write_folder`):
a failure, or a kill, leaves any previous ``out_dir`` as it was. The merge record
(``modlora_merge.json``) names the adapter by its tensor digest, so merging a delta into a folder
that already holds it is refused.

The adapter file is read by :func:`~modlora.checkpoint.read_factors`: the same parsing and
validation as :func:`~modlora.load_adapter`, and the delta from the stored kind's own factor
function, without a live model. Each merged weight is verified against the hook's math
(:func:`~modlora.hooks.add_delta`) on a probe input.
"""

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._types import Coeff
from .checkpoint import AdapterFactors, CheckpointError, read_factors, write_folder
from .checkpoint.folder import MANIFEST
from .checkpoint.io import as_path
from .checkpoint.validate import base_differences, report_base
from .hooks import add_delta
from .kinds import kind_class
from .merge_check import (
    MergeError,
    MergeReport,
    check_merged,
    merged_weight,
    probe_input,
)
from .model_folder import Plan, plan, resolve_key, skeleton, weight_files

__all__ = ["merge_checkpoint", "read_factors", "resolve_key"]

RECORD_NAME = "modlora_merge.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")


def _shard_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of one shard; unreadable data raises naming the shard."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors shard: {err}") from err


def _check_base(model_dir: Path, adapter: AdapterFactors, plans: dict, policy: str) -> None:
    """The loader's base check, on the weights as stored in the folder's shards."""
    if policy == "ignore":
        return
    weights = {}
    for shard in sorted({p.shard for p in plans.values()}):
        tensors, _ = _shard_tensors(model_dir / shard)
        for p in (p for p in plans.values() if p.shard == shard):
            stored = tensors[p.key]
            weights[p.name] = (stored, stored.T if p.transposed else stored)
    report_base(adapter.spec, base_differences(adapter.spec, weights), policy, str(model_dir))


def _merged_before(model_dir: Path, identity: str) -> str | None:
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


def _merge_one(plan: Plan, weight: Tensor, a: Tensor, b: Tensor, rtol: float):
    logical = weight.T if plan.transposed else weight  # (d_out, d_in)
    new = merged_weight(logical, a, b)
    if not bool(torch.isfinite(new).all()):
        raise MergeError(plan.name, f"the merged weight {plan.key} is not finite in {weight.dtype}")
    x = probe_input(logical.shape[1], weight.device, weight.dtype)
    y_base = F.linear(x, logical).float()
    y_merged = F.linear(x, new).float()
    delta = add_delta(torch.zeros_like(y_base), x.float(), a, b, 1.0, 1.0)  # c, scale in b
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
        out_dir: the folder to create; it loads with ``from_pretrained`` as a plain model. It
            may not be, contain or lie inside ``model_dir`` or the adapter file.
        c: the coefficient to bake in; ``None`` uses the adapter's stored deployed ``c``.
        overwrite: replace an existing ``out_dir`` that an earlier merge wrote (only after
            everything succeeded; a folder holding anything else is never replaced).
        check_base: base-weight fingerprint mismatch: ``"raise"`` (PiSSA default), ``"warn"``
            (LoRA / history default) or ``"ignore"``.
        rtol: verification tolerance (see :func:`modlora.merge.check_merged`).

    Returns:
        A :class:`~modlora.merge.MergeReport`; the same facts go to ``out_dir/modlora_merge.json``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it was not written by
            an earlier merge (or holds other files too).
        MergeError: a target has no weight key, the wrong shape, a non-float or tied weight, or
            fails verification. Nothing is written.
        CheckpointError: (a ``ValueError``) a bad adapter file, shard or shard index, or
            (``check_base="raise"``) another base model.
        ValueError: ``out_dir`` overlaps an input; ``model_dir`` already holds this delta.
    """
    model_dir = as_path(model_dir, "model_dir")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir {model_dir} is not a folder")
    if as_path(out_dir, "out_dir").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if check_base not in (None, "raise", "warn", "ignore"):
        raise ValueError(f"check_base must be 'raise', 'warn' or 'ignore', got {check_base!r}")
    weight_map, headers = weight_files(model_dir)
    model, config = skeleton(model_dir)
    names = [n for n, _ in model.named_modules()] if model is not None else None
    adapter = read_factors(adapter_path, c, names)
    earlier = _merged_before(model_dir, adapter.spec.identity)
    if earlier is not None:
        raise ValueError(
            f"{model_dir} already holds this delta (merged from {earlier}, per its "
            f"{RECORD_NAME}); merging {adapter.path} again would apply it twice"
        )
    plans = plan(model_dir, adapter, weight_map, headers, model, config)
    _check_base(model_dir, adapter, plans, check_base or kind_class(adapter.kind).base_check)

    results: dict = {}
    summary = json.dumps({"adapter": adapter.path.name, "kind": adapter.kind, "c": adapter.c})

    def write(tmp: Path) -> None:
        for shard in sorted(set(weight_map.values())):  # one shard in memory at a time
            tensors, meta = _shard_tensors(model_dir / shard)
            for p in (p for p in plans.values() if p.shard == shard):
                a, b = adapter.factors[p.name]
                tensors[p.key], results[p.name] = _merge_one(p, tensors[p.key], a, b, rtol)
            save_file(tensors, str(tmp / shard), metadata={**meta, "modlora_merge": summary})
            del tensors
        previous = None
        for item in sorted(model_dir.iterdir()):
            if item.name == RECORD_NAME:
                previous = json.loads(item.read_text())
            elif item.name == MANIFEST:
                continue
            elif item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)  # config, generation config, index, tokenizer
            elif item.is_dir():
                logger.warning("merge_checkpoint: not copying sub-folder {}", item)
        report = _report(adapter, results)
        record = {
            "adapter": str(adapter.path.resolve()),
            "adapter_digest": adapter.spec.identity,
            "base_model_dir": str(model_dir.resolve()),
            **{k: getattr(report, k) for k in ("kind", "c", "attempted", "applied")},
            "worst_rel_error": report.worst_rel_error,
            "below_resolution": list(report.below_resolution),
            "weights": {p.name: p.key for p in plans.values()},
            "previous": previous,
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")

    write_folder(
        out_dir,
        write,
        overwrite,
        writer="merge_checkpoint",
        protect=(model_dir, adapter.path),
        legacy=lambda files: RECORD_NAME in files,  # merged folders from before manifests
    )
    return _report(adapter, results)


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
