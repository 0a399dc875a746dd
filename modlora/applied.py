"""Which deltas are in a model's weights, and the refusal to add one a second time.

A model remembers its merged deltas in a small record kept on the model object itself
(``model.__dict__["_modlora_applied"]``), so ``copy.deepcopy(model)`` copies it along with the
weights it describes (and the merged adapters, bound to the copy). Each entry keeps the weights
as they were before the merge (for :func:`~modlora.unmerge`, and for the base fingerprints a
save records: an adapter saved after a merge still names its own base), an exact digest of each
merged weight, and the merged adapter's tensor digest.

Attached adapters are found in the model's module tree. Two adapters carry *the same delta* when
they are of one kind, on the same targets, with bit-identical tensors (the tensor digest a
checkpoint of them would carry): a loaded copy of a merged or attached adapter is recognised,
whatever the file name. :func:`refuse_double_delta` is every adapter's first attach guard.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .digest import adapter_digest, adapter_probe, tensors_digest
from .install import find_adapters
from .layout import unwrap_model
from .part import AdapterStateError

RECORD = "_modlora_applied"


@dataclass
class MergedDelta:
    """One merge into a model's weights.

    Attributes:
        adapter: the merged adapter (:func:`~modlora.unmerge` finds its entry by identity).
        c: the coefficient merged.
        originals: ``{target: weight before the merge}`` (storage layout).
        merged: ``{target: exact digest of the weight right after the merge}``.
        kind, names, first, digest: what identifies the delta: kind, target names, the first
            target's tensors (a cheap first comparison) and the adapter's tensor digest.
    """

    adapter: nn.Module
    c: float
    originals: dict[str, Tensor]
    merged: dict[str, str]
    kind: str
    names: tuple[str, ...]
    first: dict[str, Tensor]
    digest: str


def merged_deltas(model: nn.Module, create: bool = False) -> list[MergedDelta]:
    """The merges in ``model``'s weights, oldest first (the list itself, kept on the model)."""
    model = unwrap_model(model)
    record = model.__dict__.get(RECORD)
    if record is None:
        record = []
        if create:
            model.__dict__[RECORD] = record
    return record


def weight_digest(weight: Tensor) -> str:
    """An exact digest of a weight's bytes (dtype and shape included)."""
    return tensors_digest({"weight": weight})


def base_weight(model: nn.Module, name: str, weight: Tensor) -> Tensor:
    """Target ``name``'s weight as it was before any merge still in place (else ``weight``)."""
    for entry in merged_deltas(model):
        if name in entry.originals:
            return entry.originals[name]
    return weight


def _first(tensors: Mapping[str, Mapping[str, Tensor]]) -> tuple[str, dict[str, Tensor]]:
    name = next(iter(tensors))
    return name, dict(tensors[name])


def _same_first(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape
        and a[k].dtype == b[k].dtype
        and torch.equal(a[k].detach().cpu(), b[k].detach().cpu())
        for k in a
    )


def record_merge(model: nn.Module, adapter, c: float, originals: dict[str, Tensor]) -> None:
    """Add a completed merge of ``adapter`` to ``model``'s record."""
    tensors = adapter.target_tensors()
    entry = MergedDelta(
        adapter=adapter,
        c=c,
        originals=originals,
        merged={n: weight_digest(adapter.layout[n].weight) for n in originals},
        kind=adapter.kind,
        names=tuple(tensors),
        first={k: v.detach().to("cpu", copy=True) for k, v in _first(tensors)[1].items()},
        digest=adapter_digest(adapter),
    )
    merged_deltas(model, create=True).append(entry)


def same_delta(
    model: nn.Module,
    kind: str,
    tensors: Mapping[str, Mapping[str, Tensor]],
    digest,
    me=None,
    merged: bool = True,
) -> str | None:
    """Where ``model`` already holds the delta ``(kind, {target: {role: tensor}})``: a merge
    (unless ``merged`` is False) or an attached adapter other than ``me``; ``None`` if nowhere.

    Args:
        digest: the delta's tensor digest, or a callable computing it (only called when the
            cheap comparisons match).
    """
    names = tuple(tensors)
    if not names:
        return None
    first = _first(tensors)[1]
    known: list[str] = []

    def mine() -> str:
        if not known:
            known.append(digest() if callable(digest) else digest)
        return known[0]

    for entry in merged_deltas(model) if merged else ():
        if entry.adapter is me:
            return f"this {type(me).__name__} is already merged into the model's weights"
        same = entry.kind == kind and entry.names == names and _same_first(entry.first, first)
        if same and entry.digest == mine():
            name = type(entry.adapter).__name__
            return f"a {name} with this very delta is already merged into the model's weights"
    for other in find_adapters(model):
        if other is me or other.kind != kind:
            continue
        theirs = other.target_tensors()
        same = tuple(theirs) == names and _same_first(_first(theirs)[1], first)
        if same and adapter_digest(other) == mine():
            name = type(other).__name__
            return f"a {name} with this very delta is already attached to this model"
    return None


def _in_histories(model: nn.Module, kind: str, names: tuple, digest, me) -> str | None:
    """An attached adapter (a history) other than ``me`` that holds the delta as one round."""
    probe: list[str] = []
    for other in find_adapters(model):
        for info in other.contained_deltas() if other is not me else ():
            ranks = info.get("ranks")
            same = info.get("kind") == kind and isinstance(ranks, dict) and tuple(ranks) == names
            if same and "probe" in info:  # cheap first: the digest only when the probes agree
                probe = probe or [adapter_probe(me)]
                same = info["probe"] == probe[0]
            if same and info["digest"] == digest():
                return f"a {type(other).__name__} holding this very delta is attached to this model"
    return None


def _rounds_held(model: nn.Module, adapter) -> str | None:
    """Where the model already holds one of the deltas ``adapter`` contains (a history's rounds)."""
    for info in adapter.contained_deltas():
        kind, digest = info.get("kind"), info["digest"]
        if any(e.kind == kind and e.digest == digest for e in merged_deltas(model)):
            return "its round's delta is already merged into the model's weights"
        for other in find_adapters(model):
            if other is not adapter and other.kind == kind and adapter_digest(other) == digest:
                name = type(other).__name__
                return f"its round's delta is already attached to this model (a {name})"
    return None


def refuse_double_delta(adapter, action: str = "attach") -> None:
    """Every adapter's first attach guard (and the merge's check): refuse when the model already
    holds this adapter's delta (merged, attached, or as a round of an attached history) or, for
    a history, one of its rounds' deltas."""
    model, names = adapter.model, tuple(adapter.target_tensors())

    def mine() -> str:
        return adapter_digest(adapter)

    where = same_delta(model, adapter.kind, adapter.target_tensors(), mine, adapter)
    where = where or _in_histories(model, adapter.kind, names, mine, adapter)
    where = where or _rounds_held(model, adapter)
    if where is not None:
        raise AdapterStateError(
            f"{type(adapter).__name__} cannot {action}: {where}, so its delta would apply twice "
            "(unmerge / detach that one first)"
        )
