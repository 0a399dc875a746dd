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
from .checkpoint import AdapterFactors, read_factors, write_folder
from .checkpoint.folder import MANIFEST
from .checkpoint.io import as_path
from .hooks import add_delta
from .kinds import kind_class
from .layout import resolve_target
from .merge_base import check_folder_base
from .merge_check import (
    MergeError,
    MergeReport,
    check_merged,
    merged_weight,
    probe_input,
)
from .merge_experts import (
    DTYPES,
    Plan,
    converted_deltas,
    merge_converted,
    merge_fused,
    plan_fused,
)
from .model_folder import (
    RECORD_NAME,
    WEIGHT_SUFFIXES,
    merged_before,
    resolve_key,
    shard_tensors,
    skeleton_of,
    weight_files,
)
from .target import is_conv1d


def _plan(model_dir: Path, adapter: AdapterFactors, weight_map: dict, skeleton, config) -> dict:
    """``{target: [Plan]}``; every target is checked, the first failure raised listing the rest."""
    modules = dict(skeleton.named_modules()) if skeleton is not None else {}
    tied_out = None
    text_config = config.get_text_config() if config is not None else None
    if skeleton is not None and getattr(text_config, "tie_word_embeddings", False):
        tied_out = skeleton.get_output_embeddings()
    headers: dict[str, dict] = {}

    def header(shard: str) -> dict:
        if shard not in headers:
            with safe_open(str(model_dir / shard), "pt") as f:
                headers[shard] = {
                    k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in f.keys()  # noqa: SIM118
                }
        return headers[shard]

    plans, used, errors = {}, {}, []
    for name, (a, b) in adapter.factors.items():
        try:
            fused = resolve_target(skeleton, name) if skeleton is not None else None
            if fused is not None and fused.experts is not None:
                found = plan_fused(fused, skeleton, weight_map, header, a, b)
            elif a.dim() == 3 and skeleton is None:
                raise MergeError(name, "a fused expert weight needs the folder's config.json")
            elif a.dim() == 3:
                raise MergeError(
                    name,
                    f"per-expert factors, but the {type(skeleton).__name__} of {model_dir} has "
                    "no fused expert weight of that name",
                )
            else:
                found = [_plan_one(model_dir, name, a, b, weight_map, modules, tied_out, header)]
            for plan in found:
                if plan.key in used:
                    raise MergeError(name, f"maps to {plan.key}, like target {used[plan.key]!r}")
                used[plan.key] = name
            plans[name] = found
        except MergeError as err:
            errors.append(err)
    if errors:
        first, rest = errors[0], [str(e) for e in errors[1:]]
        more = f"; {len(rest)} more target(s) fail too: {rest[:3]}" if rest else ""
        raise MergeError(first.target, f"{first.reason}{more}", " (nothing written to out_dir)")
    return plans


def _plan_one(model_dir, name, a, b, weight_map, modules, tied_out, header) -> Plan:
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
    shape, dtype = header(shard)[key]
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
    if dtype not in DTYPES:
        raise MergeError(name, f"{key} is stored as {dtype}, not a float weight (quantized?)")
    return Plan(name, key, shard, transposed, DTYPES[dtype])


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
        out_dir: the folder to create; it loads with ``from_pretrained`` as a plain model.
        c: the coefficient to bake in; ``None`` uses the adapter's stored deployed ``c``.
        overwrite: replace an existing ``out_dir`` that an earlier merge wrote (only after
            everything succeeded; a folder holding anything else is never replaced).
        check_base: base-weight fingerprint mismatch: ``"raise"`` (PiSSA default), ``"warn"``
            (LoRA / history default) or ``"ignore"``.
        rtol: verification tolerance (see :func:`modlora.merge.check_merged`).

    Returns:
        A :class:`~modlora.merge.MergeReport`; the same facts go to ``out_dir/modlora_merge.json``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
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
    weight_map, _ = weight_files(model_dir)
    skeleton, config = skeleton_of(model_dir)
    names = [n for n, _ in skeleton.named_modules()] if skeleton is not None else None
    adapter = read_factors(adapter_path, c, names)
    earlier = merged_before(model_dir, adapter.spec.identity)
    if earlier is not None:
        raise ValueError(
            f"{model_dir} already holds this delta (merged from {earlier}, per its "
            f"{RECORD_NAME}); merging {adapter.path} again would apply it twice"
        )
    plans = _plan(model_dir, adapter, weight_map, skeleton, config)
    policy = check_base or kind_class(adapter.kind).base_check
    check_folder_base(model_dir, adapter, plans, policy, skeleton)
    n_tensors = sum(len(found) for found in plans.values())

    results: dict = {}
    pieces: dict = {}  # {fused target: {disk key: delta}} while its shards are written
    summary = json.dumps({"adapter": adapter.path.name, "kind": adapter.kind, "c": adapter.c})

    def write(tmp: Path) -> None:
        for shard in sorted(set(weight_map.values())):  # one shard in memory at a time
            tensors, meta = shard_tensors(model_dir / shard)
            for plan in (p for found in plans.values() for p in found if p.shard == shard):
                a, b = adapter.factors[plan.name]
                weight = tensors[plan.key]
                if plan.converted:  # one expert's piece of a fused weight stored per expert
                    if plan.name not in pieces:
                        target = resolve_target(skeleton, plan.name)
                        pieces[plan.name] = converted_deltas(target, skeleton, a, b)
                    delta = pieces[plan.name].pop(plan.key)
                    tensors[plan.key], results[plan.key] = merge_converted(
                        plan, weight, delta, rtol
                    )
                elif plan.experts is not None:
                    tensors[plan.key], results[plan.name] = merge_fused(plan, weight, a, b, rtol)
                else:
                    tensors[plan.key], results[plan.name] = _merge_one(plan, weight, a, b, rtol)
            save_file(tensors, str(tmp / shard), metadata={**meta, "modlora_merge": summary})
            del tensors
        previous = None
        for item in sorted(model_dir.iterdir()):
            if item.name == RECORD_NAME:
                previous = json.loads(item.read_text())
            elif item.name == MANIFEST:
                continue
            elif item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)  # config, generation config, index, tokenizer
            elif item.is_dir():
                logger.warning("merge_checkpoint: not copying sub-folder {}", item)
        report = _report(adapter, results, n_tensors)
        record = {
            "adapter": str(adapter.path.resolve()),
            "adapter_digest": adapter.spec.identity,
            "base_model_dir": str(model_dir.resolve()),
            **{k: getattr(report, k) for k in ("kind", "c", "attempted", "applied")},
            "worst_rel_error": report.worst_rel_error,
            "below_resolution": list(report.below_resolution),
            "weights": {  # one key per target, a list for a fused weight stored per expert
                n: found[0].key if len(found) == 1 else [p.key for p in found]
                for n, found in plans.items()
            },
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
    return _report(adapter, results, n_tensors)


def _report(adapter: AdapterFactors, results: dict, attempted: int) -> MergeReport:
    """The report; ``attempted`` counts on-disk tensors (one per expert when stored so)."""
    nonzero = {n: r for n, (r, _) in results.items() if r > 0}
    worst = max(nonzero, key=nonzero.get) if nonzero else None
    return MergeReport(
        kind=adapter.kind,
        c=adapter.c,
        attempted=attempted,
        applied=len(results),
        worst_rel_error=nonzero[worst] if worst else 0.0,
        worst_target=worst,
        below_resolution=tuple(n for n, (_, below) in results.items() if below),
        targets=tuple(results),
    )
