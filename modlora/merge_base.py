"""The offline merge's base check: the loader's check on the weights as stored in a folder."""

from pathlib import Path

from .checkpoint import AdapterFactors
from .checkpoint.validate import base_differences, report_base
from .layout import resolve_target
from .merge_experts import fused_from_pieces
from .model_folder import shard_tensors


def check_folder_base(
    model_dir: Path, adapter: AdapterFactors, plans: dict, policy: str, skeleton
) -> None:
    """The loader's base check (:mod:`modlora.checkpoint.validate`), on the weights as stored in
    the folder's shards. A fused weight stored per expert is put back together from its
    per-expert tensors (possibly across shards) and compared like the live one."""
    if policy == "ignore":
        return
    differ, pieces = [], {}  # pieces: {fused target: {disk key: tensor}} until it is whole
    for shard in sorted({p.shard for found in plans.values() for p in found}):
        tensors, _ = shard_tensors(model_dir / shard)  # one shard in memory at a time
        weights = {}
        for name, found in plans.items():
            here = [p for p in found if p.shard == shard]
            if not here:
                continue
            if found[0].converted:
                parts = pieces.setdefault(name, {})
                parts.update({p.key: tensors[p.key] for p in here})
                if len(parts) == len(found):
                    target = resolve_target(skeleton, name)
                    fused = fused_from_pieces(target, skeleton, pieces.pop(name))
                    weights[name] = (fused, None)
            else:
                stored = tensors[found[0].key]
                dense = stored.transpose(-2, -1) if found[0].transposed else stored
                weights[name] = (stored, dense)
        differ += base_differences(adapter.spec, weights)
    report_base(adapter.spec, differ, policy, str(model_dir))
