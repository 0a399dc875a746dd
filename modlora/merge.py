"""Merge an adapter into a live model's weights (``W += B(c) @ A``), verified and reversible.

The merge reuses :meth:`~modlora.adapter.LowRankAdapter.delta_factors`, so it cannot disagree with
the hooks — and it proves it: every merged layer is run on a probe input and compared with the
base layer plus the hook's own delta (:func:`~modlora.hooks.add_delta` on the part's factors). Any failure restores every
weight touched so far, bit for bit, and raises :class:`MergeError` naming the target, the shapes
and the reason. Nothing is ever skipped silently.

Decisions:

* The update is accumulated in float32 (``W.float() + B @ A``) and cast to the weight's dtype
  once, so a bf16 weight gets the correctly rounded merged value (a naive bf16 add rounds twice).
* The originals are kept so :func:`unmerge` is bit-exact; ``store="cpu"`` (default) keeps them in
  CPU memory, ``store="device"`` on each layer's own device.
* A merged adapter may not be merged again before :func:`unmerge`; merges of different adapters
  may stack and are undone last-in first-out where they share targets.
* An *attached* adapter is refused (its hooks would add the delta a second time); detach it (a
  :class:`~modlora.HistoryBake`: ``remove()``) first. A delta already in the model (this adapter
  merged, or an identical copy merged or attached: :mod:`modlora.applied`) is refused too, and
  likewise a merged delta refuses to attach until it is unmerged. ``enabled``/``gate`` are run-time switches
  that a plain weight cannot have: the merge ignores them.
* Refused before anything is written: quantized or meta/offloaded weights, a weight tied to another
  parameter (``lm_head`` sharing the embedding), a non-float weight, factors that do not fit, a
  weight sharded by FSDP2.
"""

import torch
from loguru import logger
from torch import Tensor, nn

from ._types import Coeff
from .adapter import LowRankAdapter
from .applied import merged_deltas, record_merge, refuse_double_delta, weight_digest
from .experts import add_to_weight
from .hooks import add_delta
from .merge_check import (
    MergeError,
    MergeReport,
    check_merged,
    merged_weight,
    probe_input,
)
from .part import AdapterStateError
from .sharding import is_dtensor, unmergeable_shard
from .target import Target, is_quantized_weight


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    by_storage: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(p.data_ptr(), []).append(pname)
    return by_storage


def _validate(model: nn.Module, adapter: LowRankAdapter, factors: dict) -> None:
    """Every check that needs no write; raises MergeError on the first bad target."""
    modules = dict(model.named_modules())
    storages = _tied_names(model)
    for target in adapter.layout:
        name, module = target.name, target.module
        a, b = factors[name]
        where = f" (A {tuple(a.shape)}, B {tuple(b.shape)})"
        owner = name if target.param is None else name.rpartition(".")[0]
        if modules.get(owner) is not module:
            raise MergeError(name, "the model no longer has this layer under that name", where)
        weight = target.weight
        if target.quantized or is_quantized_weight(weight):
            raise MergeError(
                name,
                f"the layer is quantized ({type(weight).__name__}, {weight.dtype}) and modlora "
                "cannot dequantize it; load the base unquantized to merge",
                where,
            )
        if weight.device.type == "meta":
            raise MergeError(name, "the weight is on the meta device (offloaded?)", where)
        logical = tuple(target.dense_weight().shape)
        lead = target.shape[:-2]  # (E,) for fused experts
        if logical != target.shape or a.shape[:-2] != lead or a.shape[-1] != target.d_in:
            raise MergeError(
                name,
                f"shape mismatch: weight {tuple(weight.shape)} (logical {logical}), layout "
                f"{target.shape}",
                where,
            )
        if b.shape != (*lead, target.d_out, a.shape[-2]):
            raise MergeError(name, "shape mismatch between the factors", where)
        own = name if target.param else f"{name}.weight"
        tied = [n for n in storages.get(weight.data_ptr(), []) if n != own]
        if tied:
            raise MergeError(
                name,
                f"its weight is shared with {tied}; merging would change those too "
                "(exclude this layer, or untie the weights first)",
            )
        if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise MergeError(name, "the adapter's factors hold non-finite values", where)


@torch.no_grad()
def _merge_target(
    target: Target, a: Tensor, b: Tensor, adapter: LowRankAdapter, c: float, rtol: float
) -> tuple[float, bool]:
    weight = target.dense_weight()  # ([E,] d_out, d_in) view
    x = probe_input(target.d_in, target.device, weight.dtype)
    y_base = _outputs(target, x)
    hook_a, hook_b, scale = adapter.part(target.name).checked_factors()
    if target.experts is None:
        delta = add_delta(torch.zeros_like(y_base), x, hook_a, hook_b, scale, c)  # the hook's math
    else:  # the experts hook's math: W + c·scale·B A, per expert
        delta = torch.matmul(x, add_to_weight(weight, hook_b, hook_a, scale, c).mT).float() - y_base
    new = merged_weight(weight, a, b)
    if not bool(torch.isfinite(new).all()):
        raise MergeError(
            target.name,
            f"the merged weight is not finite in {weight.dtype}",
            f" (weight {tuple(weight.shape)}, max |ΔW| {float((b @ a).abs().max()):.3e})",
        )
    weight.copy_(new)
    y_merged = _outputs(target, x)
    col_norms = torch.linalg.vector_norm(new.float(), dim=-2)  # ([E,] d_in)
    if target.experts is None:
        return check_merged(target.name, y_base, y_merged, delta, col_norms, x, weight.dtype, rtol)
    per_expert = [  # every expert is checked as a layer of its own
        check_merged(f"{target.name}[{e}]", *ys, x, weight.dtype, rtol)
        for e, ys in enumerate(zip(y_base, y_merged, delta, col_norms, strict=True))
    ]
    return max(r for r, _ in per_expert), any(below for _, below in per_expert)


def _outputs(target: Target, x: Tensor) -> Tensor:
    """The layer's output on probe rows ``x``, float32: ``(n, d_out)``, experts ``(E, n, d_out)``."""
    if target.experts is None:
        return target.module.forward(x).float()
    return torch.matmul(x, target.dense_weight().mT).float()  # (E, n, d_out)


def merge(
    model: nn.Module,
    adapter: LowRankAdapter,
    c: Coeff | None = 1.0,
    *,
    rtol: float = 1e-3,
    store: str = "cpu",
) -> MergeReport:
    """Merge ``adapter`` at coefficient ``c`` into ``model``'s weights, in place.

    Args:
        model: the model the adapter was built on.
        adapter: any modlora adapter (LoRA, PiSSA, HistoryBake), not attached.
        c: the coefficient to bake in; ``None`` uses the adapter's ``deployed_c``.
        rtol: allowed relative error of the merged layer's output against the hooked
            forward (on top of the weight dtype's rounding noise).
        store: where the originals are kept for :func:`unmerge`: ``"cpu"`` or ``"device"``.

    Returns:
        A :class:`MergeReport`.

    Raises:
        ValueError: another model, a per-sample or invalid ``c``, a bad ``store``.
        AdapterStateError: the adapter is attached or already merged into this model.
        MergeError: a target could not be merged or failed verification; every weight touched
            was restored bit for bit first.
    """
    if not isinstance(adapter, LowRankAdapter):
        raise TypeError(f"merge needs a modlora adapter, got {type(adapter).__name__}")
    model = adapter.check_model(model)
    value = adapter.scalar_c(c, "merge")
    if store not in ("cpu", "device"):
        raise ValueError(f"store must be 'cpu' or 'device', got {store!r}")
    kind = type(adapter).__name__
    if adapter.attached:
        raise AdapterStateError(
            f"{kind} is attached: merging it would apply its delta twice; detach() it "
            "(HistoryBake: remove()) before merging"
        )
    refuse_double_delta(adapter, "merge")

    for target in adapter.layout:  # before delta_factors, which would gather the shards
        if is_dtensor(target.weight):
            raise MergeError(target.name, unmergeable_shard(target.weight))
    factors = adapter.delta_factors(value)
    _validate(model, adapter, factors)
    originals: dict[str, Tensor] = {}
    results: dict[str, tuple[float, bool]] = {}
    try:
        for target in adapter.layout:
            weight = target.weight
            keep = weight.detach().to("cpu", copy=True) if store == "cpu" else weight.clone()
            originals[target.name] = keep
            a, b = factors[target.name]
            try:
                results[target.name] = _merge_target(target, a, b, adapter, value, rtol)
            except MergeError:
                raise
            except Exception as err:
                raise MergeError(target.name, f"{type(err).__name__}: {err}") from err
    except BaseException as err:
        _restore(adapter, originals)
        if isinstance(err, MergeError):
            err.args = (f"{err.args[0]}; restored {len(originals)} weight(s): model unchanged",)
        raise

    record_merge(model, adapter, value, originals)
    nonzero = {n: r for n, r in results.items() if r[0] > 0}
    worst = max(nonzero, key=lambda n: nonzero[n][0]) if nonzero else None
    faint = tuple(n for n, (_, below) in results.items() if below)
    if faint:
        logger.warning(
            "merge: the delta of {} target(s) (e.g. {}) is below the rounding noise of their "
            "dtype; merged as exactly as the dtype allows",
            len(faint),
            faint[0],
        )
    return MergeReport(
        kind=adapter.kind,
        c=value,
        attempted=len(adapter.layout),
        applied=len(results),
        worst_rel_error=nonzero[worst][0] if worst else 0.0,
        worst_target=worst,
        below_resolution=faint,
        targets=tuple(results),
    )


@torch.no_grad()
def _restore(adapter: LowRankAdapter, originals: dict[str, Tensor]) -> None:
    for name, original in originals.items():
        adapter.layout[name].weight.copy_(original)


def unmerge(model: nn.Module, adapter: LowRankAdapter, *, force: bool = False) -> None:
    """Restore the weights :func:`merge` changed, bit for bit.

    Args:
        model: the model ``adapter`` was merged into.
        adapter: the merged adapter.
        force: restore even if the merged weights were changed since the merge (that change is
            then lost).

    Raises:
        AdapterStateError: ``adapter`` is not merged into ``model``; or a later merge on the
            same targets is still in place (unmerge that one first).
        RuntimeError: a merged weight changed shape, dtype or values since the merge (values:
            unless ``force``). Nothing is restored in that case.
    """
    stack = merged_deltas(model)
    index = next((i for i, m in enumerate(stack) if m.adapter is adapter), None)
    if index is None:
        raise AdapterStateError(f"{type(adapter).__name__} is not merged into this model")
    entry = stack[index]
    for later in stack[index + 1 :]:
        shared = sorted(set(later.originals) & set(entry.originals))
        if shared:
            raise AdapterStateError(
                f"{type(later.adapter).__name__} was merged later on the same targets "
                f"(e.g. {shared[0]!r}); unmerge it first"
            )
    for name, original in entry.originals.items():
        weight = adapter.layout[name].weight
        if weight.shape != original.shape or weight.dtype != original.dtype:
            raise RuntimeError(
                f"cannot unmerge {name!r}: the weight is now {tuple(weight.shape)} {weight.dtype}, "
                f"it was {tuple(original.shape)} {original.dtype} when merged"
            )
        if not force and weight_digest(weight) != entry.merged[name]:
            raise RuntimeError(
                f"cannot unmerge {name!r}: its weight changed since the merge (trained or edited?); "
                "unmerge(..., force=True) restores the pre-merge weight and drops that change"
            )
    _restore(adapter, entry.originals)
    del stack[index]
