"""The offline merge of fused expert weights: where their delta goes on disk, and checking it.

A fused expert weight (``mlp.experts.gate_up_proj``, ``(E, …)``) is stored on disk either as it
is in the model (one 3-D tensor under its own name, as GPT-OSS checkpoints do) or split per expert
under the names transformers' own conversion mapping reads it from
(``block_sparse_moe.experts.<e>.w1.weight`` + ``….w3.weight`` for Mixtral,
``mlp.experts.<e>.gate_proj.weight`` + ``up_proj`` for Qwen3-MoE / OLMoE …), possibly across
shards. The per-expert layout is never guessed: the delta, computed in the model's fused layout,
is put on disk by transformers' ``revert_weight_conversion`` (what ``save_pretrained`` does to
the weights themselves), planned on meta tensors first so every key and shape is checked before
anything is written. The expert count is the model's (its config), never read from the keys.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .merge_check import MergeError, check_merged, probe_input
from .target import Target

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Plan:
    """One on-disk tensor a target's delta goes into.

    Attributes:
        name: the adapter target.
        key: the tensor's key on disk; ``shard``: the file holding it; ``dtype``: its dtype.
        transposed: stored ``(d_in, d_out)`` (Conv1D; fused experts ``(E, d_in, d_out)``).
        experts: a fused expert weight stored whole under ``key`` (``None`` otherwise).
        converted: one of the per-expert tensors a fused weight is stored as.
    """

    name: str
    key: str
    shard: str
    transposed: bool
    dtype: torch.dtype
    experts: int | None = None
    converted: bool = False


def storage_delta(target: Target, a: Tensor, b: Tensor) -> Tensor:
    """``B @ A`` per expert, ``(E, d_out, d_in)``, in the weight's stored layout."""
    delta = torch.bmm(b.float(), a.float())  # (E, d_out, d_in)
    return delta.mT if target.transposed else delta


def plan_fused(
    target: Target, skeleton: nn.Module, weight_map: dict, header, a: Tensor, b: Tensor
) -> list[Plan]:
    """The on-disk tensors of fused weight ``target`` (see the module docstring).

    Args:
        target: the fused weight in the model skeleton (built from the folder's config).
        skeleton: the model on the meta device.
        weight_map: ``{key: shard}`` of the folder.
        header: ``header(shard) -> {key: (shape, dtype name)}``.
        a: the adapter's ``A`` for the target, ``(E, r, d_in)``.
        b: the adapter's ``B`` for the target, ``(E, d_out, r)``.

    Raises:
        MergeError: the adapter's expert count or widths are not the folder's model's, a key is
            missing, a shape or dtype does not fit, or the conversion cannot be established;
            nothing has been written.
    """
    name = target.name
    want = (target.experts, target.d_out, target.d_in)
    have = (int(a.shape[0]), int(b.shape[-2]), int(a.shape[-1]))  # (E, d_out, d_in)
    if have != want:
        raise MergeError(
            name,
            f"the adapter's factors (A {tuple(a.shape)}, B {tuple(b.shape)}) are for experts="
            f"{have[0]}, d_out={have[1]}, d_in={have[2]}; the folder's model has experts="
            f"{want[0]}, d_out={want[1]}, d_in={want[2]}",
        )
    stored = tuple(target.weight.shape)  # (E, …) as the model holds it
    if name in weight_map:  # stored fused, under its own name
        pieces = {name: stored}
    else:
        from transformers.core_model_loading import revert_weight_conversion

        probe = torch.empty(stored, device="meta")
        try:
            reverted = revert_weight_conversion(skeleton, {name: probe})
        except Exception as err:
            raise MergeError(
                name, f"cannot map the fused weight to the folder's keys ({err})"
            ) from None
        pieces = {k: tuple(v.shape) for k, v in reverted.items()}
        if sum(torch.Size(s).numel() for s in pieces.values()) != probe.numel():
            raise MergeError(
                name, f"the conversion to disk keys does not keep every element: {pieces}"
            )
    plans = []
    for key, shape in pieces.items():
        if key not in weight_map:
            raise MergeError(
                name,
                f"the folder has no {key!r} (expert weights stored as {sorted(pieces)[:3]}…); an "
                "unrecognised layout — nothing was written",
            )
        disk_shape, dtype = header(weight_map[key])[key]
        if disk_shape != shape:
            raise MergeError(
                name, f"shape mismatch: {key} is {disk_shape} on disk, the model needs {shape}"
            )
        if dtype not in DTYPES:
            raise MergeError(name, f"{key} is stored as {dtype}, not a float weight (quantized?)")
        converted = key != name
        plans.append(
            Plan(
                name,
                key,
                weight_map[key],
                target.transposed,
                DTYPES[dtype],
                None if converted else target.experts,
                converted,
            )  # fmt: skip
        )
    return plans


def converted_deltas(target: Target, skeleton: nn.Module, a: Tensor, b: Tensor) -> dict:
    """``{disk key: delta}`` of a fused weight stored per expert (float32)."""
    from transformers.core_model_loading import revert_weight_conversion

    fused = storage_delta(target, a, b)
    pieces = revert_weight_conversion(skeleton, {target.name: fused})
    kept = sum(float(p.double().square().sum()) for p in pieces.values())
    total = float(fused.double().square().sum())
    if abs(kept - total) > 1e-9 * max(total, 1.0):  # every element once: the same sum of squares
        raise MergeError(target.name, f"the per-expert pieces hold {kept:.6g} of {total:.6g}")
    return {k: v.contiguous() for k, v in pieces.items()}


def fused_from_pieces(target: Target, skeleton: nn.Module, pieces: dict[str, Tensor]) -> Tensor:
    """The fused weight ``(E, …)`` as the model holds it, put together from its per-expert disk
    tensors ``{key: tensor}``: the inverse of ``revert_weight_conversion``, read off the
    conversion of the element indices (so every element comes from exactly one disk value)."""
    from transformers.core_model_loading import revert_weight_conversion

    stored = tuple(target.weight.shape)
    index = torch.arange(torch.Size(stored).numel()).reshape(stored)  # (E, …) element indices
    where = revert_weight_conversion(skeleton, {target.name: index})
    dtype = next(iter(pieces.values())).dtype
    fused = torch.empty(index.numel(), dtype=dtype)
    for key, positions in where.items():
        fused[positions.reshape(-1)] = pieces[key].reshape(-1).to(dtype)
    return fused.reshape(stored)


def merge_fused(plan: Plan, weight: Tensor, a: Tensor, b: Tensor, rtol: float):
    """``weight`` stored ``(E, …)`` plus the delta, each expert verified as a layer of its own."""
    logical = weight.mT if plan.transposed else weight  # (E, d_out, d_in)
    new = torch.baddbmm(logical.float(), b.float(), a.float()).to(weight.dtype)
    _finite(plan, new, weight)
    x = probe_input(logical.shape[-1], weight.device, weight.dtype)
    y_base = torch.matmul(x, logical.mT).float()  # (E, n, d_out)
    y_merged = torch.matmul(x, new.mT).float()
    delta = torch.matmul(torch.matmul(x.float(), a.float().mT), b.float().mT)  # (E, n, d_out)
    norms = torch.linalg.vector_norm(new.float(), dim=-2)  # (E, d_in)
    results = [
        check_merged(f"{plan.name}[{e}]", yb, ym, d, cn, x, weight.dtype, rtol)
        for e, (yb, ym, d, cn) in enumerate(zip(y_base, y_merged, delta, norms, strict=True))
    ]
    out = new.mT if plan.transposed else new
    return out.contiguous(), (max(r for r, _ in results), any(b for _, b in results))


def merge_converted(plan: Plan, weight: Tensor, delta: Tensor, rtol: float):
    """One on-disk tensor of a fused weight stored under other keys plus its piece of the delta:
    one expert's 2-D weight, or all experts' 3-D weight under another name (GraniteMoE's
    ``input_linear``), each expert checked on probe rows."""
    new = (weight.float() + delta.float()).to(weight.dtype)
    _finite(plan, new, weight)
    if weight.dim() == 2:
        return new, _check_piece(plan.key, weight, new, delta, rtol)
    results = [
        _check_piece(f"{plan.key}[{e}]", w, n, d, rtol)
        for e, (w, n, d) in enumerate(zip(weight, new, delta, strict=True))
    ]
    return new, (max(r for r, _ in results), any(b for _, b in results))


def _check_piece(name: str, weight: Tensor, new: Tensor, delta: Tensor, rtol: float):
    x = probe_input(weight.shape[-1], weight.device, weight.dtype)
    y_base, y_merged = (torch.nn.functional.linear(x, w).float() for w in (weight, new))
    y_delta = torch.nn.functional.linear(x.float(), delta.float())
    norms = torch.linalg.vector_norm(new.float(), dim=0)
    return check_merged(name, y_base, y_merged, y_delta, norms, x, weight.dtype, rtol)


def _finite(plan: Plan, new: Tensor, weight: Tensor) -> None:
    if not bool(torch.isfinite(new).all()):
        raise MergeError(plan.name, f"the merged weight {plan.key} is not finite in {weight.dtype}")
