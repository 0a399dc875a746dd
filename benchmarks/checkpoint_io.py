"""Case 7: save and load time of a checkpoint with many targets vs raw ``safetensors``.

``modlora`` side: ``adapter.save(path)`` (metadata, base-weight fingerprints, atomic write with
fsync) and ``modlora.load_adapter(model, path)`` (validation of file, tensors, model and base,
then a rebuilt adapter). Raw side: ``safetensors.torch.save_file`` of the same tensors and
``safetensors.torch.load_file`` (no fsync, no checks, no adapter). ``fingerprints`` times one
pass of the sampled ``v2`` fingerprint over the target layers' base weights (save and load
compute it), ``fingerprints_v1`` one pass of the full ``v1`` fingerprint (save alone computes it,
for release 0.1.0's reader).
"""

import os
import tempfile

import safetensors.torch
from torch import nn

from .common import Case, interleave, paired_ratio, signed_lora, summarize


def checkpoint_case(model: nn.Module, repeats: int, clock: str, r: int = 16) -> dict:
    """Interleaved save / load timings of one LoRA on every linear layer of ``model``."""
    import modlora as ml

    lora = signed_lora(model, r=r)
    state = {k: v.contiguous() for k, v in lora.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        ours, raw = os.path.join(tmp, "adapter.safetensors"), os.path.join(tmp, "raw.safetensors")
        lora.save(ours)
        safetensors.torch.save_file(state, raw)
        loaded = ml.load_adapter(model, ours)
        same = all(
            (p.detach() == q.detach()).all()
            for (_, p), (_, q) in zip(
                sorted(lora.named_parameters()), sorted(loaded.named_parameters()), strict=True
            )
        )
        from modlora.digest import sample_fingerprint, weight_fingerprint

        weights = [t.module.weight for t in lora.layout]
        cases = {
            "fingerprints": Case(lambda: [sample_fingerprint(w) for w in weights]),
            "fingerprints_v1": Case(lambda: [weight_fingerprint(w) for w in weights]),
            "modlora_save": Case(lambda: lora.save(ours)),
            "raw_save": Case(lambda: safetensors.torch.save_file(state, raw)),
            "modlora_load": Case(lambda: ml.load_adapter(model, ours)),
            "raw_load": Case(lambda: safetensors.torch.load_file(raw)),
        }
        samples = interleave(cases, repeats)
        sizes = {"modlora_bytes": os.path.getsize(ours), "raw_bytes": os.path.getsize(raw)}
    return {
        "targets": len(lora.layout),
        "r": r,
        "tensors": len(state),
        "round_trip_equal": bool(same),
        **sizes,
        "cases": summarize(samples, "raw_save", clock),
        "ratios": {  # the save includes an fsync, which is wall time but not CPU time
            f"{op}_vs_raw_{c}": paired_ratio(samples, f"modlora_{op}", f"raw_{op}", c)
            for op in ("save", "load")
            for c in ("cpu", "wall")
        },
    }
