"""Rank inference from factor shapes, shared by checkpoints, merge and PEFT import.

Every low-rank delta is ``ΔW = up @ down`` with ``down: (r, d_in)`` and ``up: (d_out, r)``:

=================  ===========================  ============================
layout             down                         up
=================  ===========================  ============================
LoRA / history     ``A (r, d_in)``              ``B (d_out, r)``
PiSSA              ``Vh (r, d_in)``             ``U (d_out, r)``
experts (3-D)      ``A (experts, r, d_in)``     ``B (experts, d_out, r)``
=================  ===========================  ============================

So the rank is ``down.shape[-2]`` and ``up.shape[-1]``, never ``shape[0]`` of whatever tensor
comes first (PEFT stores the same orientation). :func:`infer_rank` reads both, checks that they
agree (and, when given, agree with the layer's widths and a rank from metadata), and raises a
``ValueError`` naming the target and every shape involved.

Example:
    >>> infer_rank("model.layers.0.self_attn.q_proj", a.shape, b.shape, expected=8)
    8
    >>> infer_rank(name, vh, u, down_label="Vh", up_label="U")   # PiSSA
"""

from collections.abc import Mapping, Sequence

from torch import Tensor

Shape = Tensor | Sequence[int]
"""A tensor or its shape (``torch.Size`` or a tuple of ints)."""


def _shape(x: Shape) -> tuple[int, ...]:
    return tuple(int(n) for n in (x.shape if isinstance(x, Tensor) else x))


def infer_rank(
    target: str,
    down: Shape,
    up: Shape,
    expected: int | None = None,
    *,
    d_in: int | None = None,
    d_out: int | None = None,
    down_label: str = "A",
    up_label: str = "B",
) -> int:
    """The rank of one target's factors, read from their shapes and cross-checked.

    Args:
        target: the target's module name (used in error messages only).
        down: ``(r, d_in)`` or ``(experts, r, d_in)`` — LoRA ``A``, PiSSA ``Vh`` (tensor or shape).
        up: ``(d_out, r)`` or ``(experts, d_out, r)`` — LoRA ``B``, PiSSA ``U`` (tensor or shape).
        expected: a rank from metadata to check against (``None``: no check).
        d_in: the layer's input width to check ``down`` against (``None``: no check).
        d_out: the layer's output width to check ``up`` against (``None``: no check).
        down_label: how errors call ``down`` (``"A"``, ``"Vh"``, ``"lora_A"``...).
        up_label: how errors call ``up`` (``"B"``, ``"U"``, ``"lora_B"``...).

    Returns:
        ``r``, the rank shared by both factors.

    Raises:
        ValueError: the factors are not both 2-D or both 3-D, disagree on the rank or the
            number of experts, have a zero rank, do not fit ``d_in`` / ``d_out``, or contradict
            ``expected``. The message names the target and the shapes.
    """
    ds, us = _shape(down), _shape(up)
    where = f"target {target!r}: {down_label} {ds}, {up_label} {us}"
    if len(ds) not in (2, 3) or len(ds) != len(us):
        raise ValueError(
            f"{where}: expected {down_label} (r, d_in) and {up_label} (d_out, r), or both 3-D "
            "(experts, r, d_in) / (experts, d_out, r)"
        )
    if len(ds) == 3 and ds[0] != us[0]:
        raise ValueError(f"{where}: expert counts differ ({ds[0]} vs {us[0]})")
    r_down, r_up = ds[-2], us[-1]
    if r_down != r_up:
        raise ValueError(
            f"{where}: rank mismatch — {down_label} has r={r_down} on axis -2, "
            f"{up_label} has r={r_up} on axis -1"
        )
    if r_down == 0:
        raise ValueError(f"{where}: rank is 0")
    if d_in is not None and ds[-1] != d_in:
        raise ValueError(f"{where}: {down_label} has d_in={ds[-1]} but the layer has d_in={d_in}")
    if d_out is not None and us[-2] != d_out:
        raise ValueError(f"{where}: {up_label} has d_out={us[-2]} but the layer has d_out={d_out}")
    if expected is not None and r_down != expected:
        raise ValueError(f"{where}: shapes give r={r_down} but the metadata says r={expected}")
    return r_down


def check_rank_vector(
    target: str, label: str, vector: Shape, rank: int, experts: int | None = None
) -> None:
    """Check a per-direction vector (PiSSA ``S`` / ``delta_s``) has shape ``(rank,)`` — or
    ``(experts, rank)`` for a fused expert weight.

    Raises:
        ValueError: any other shape; the message names the target, the label and the shape.
    """
    shape, want = _shape(vector), (rank,) if experts is None else (experts, rank)
    if shape != want:
        raise ValueError(f"target {target!r}: {label} has shape {shape}, expected {want}")


def infer_ranks(
    factors: Mapping[str, tuple[Shape, Shape]],
    expected: int | Mapping[str, int] | None = None,
    *,
    down_label: str = "A",
    up_label: str = "B",
) -> dict[str, int]:
    """:func:`infer_rank` for every target of ``{target: (down, up)}``.

    Args:
        factors: ``{target name: (down, up)}`` tensors or shapes.
        expected: one rank for all targets, or ``{target: rank}`` (targets not in it unchecked).
        down_label, up_label: names used in error messages.

    Returns:
        ``{target name: r}``.
    """
    out = {}
    for name, (down, up) in factors.items():
        want = expected.get(name) if isinstance(expected, Mapping) else expected
        out[name] = infer_rank(name, down, up, want, down_label=down_label, up_label=up_label)
    return out
