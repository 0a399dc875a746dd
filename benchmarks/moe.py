"""MoE case: LoRA on a small Mixtral's fused expert weights vs PEFT's ``target_parameters``.

Both adapt exactly the fused ``gate_up_proj`` / ``down_proj`` weights with the same rank and the
same factors; ``merged`` is ``modlora.merge`` at ``c = 1``. Cases run interleaved in one process.
"""

import tempfile
from pathlib import Path

import torch
import transformers as tf
from torch import nn

import modlora as ml

from .common import (
    Case,
    clone,
    interleave,
    max_abs_diff,
    min_ratio,
    paired_iqr,
    paired_ratio,
    summarize,
    token_inputs,
)

RATIOS = {
    "base_again_vs_base": ("base_again", "base"),
    "hooked_c1_vs_peft": ("hooked_c1", "peft"),
    "hooked_c0_vs_base": ("hooked_c0", "base"),
    "merged_vs_base": ("merged", "base"),
    "peft_vs_base": ("peft", "base"),
}


def small_mixtral(hidden: int, layers: int, experts: int, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    config = tf.MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    return tf.MixtralForCausalLM(config).eval()


def _peft_twin(base_copy: nn.Module, lora) -> nn.Module:
    """PEFT LoRA on the same fused weights (``target_parameters``), holding the same factors:
    ``lora`` exported at ``c = 1`` and loaded by PEFT itself."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as folder:
        ml.export_peft(lora, Path(folder) / "peft", c=1.0)
        return PeftModel.from_pretrained(base_copy, str(Path(folder) / "peft")).eval()


def _runner(model, inputs):
    def run():
        with torch.no_grad():
            model(**inputs)

    return run


def moe_case(model: nn.Module, inputs: dict, repeats: int, clock: str, r: int = 16) -> dict:
    """Base (twice), hooked at c=1 and c=0, merged, and PEFT on the fused expert weights."""
    torch.manual_seed(1)
    lora = ml.ModulatedLoRA(model, r=r, alpha=2 * r, targets=["experts"], init="signed")
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0.0, 0.02)
    peft_model = _peft_twin(clone(model), lora)
    merged = clone(model)
    twin = ml.ModulatedLoRA(merged, r=r, alpha=2 * r, targets=["experts"])
    twin.load_state_dict(lora.state_dict())
    ml.merge(merged, twin, c=1.0)
    run_base = _runner(model, inputs)
    with torch.no_grad():
        base_out = model(**inputs).logits
        with lora(model, c=1.0):
            hooked_out = model(**inputs).logits
        check = {
            "hooked_vs_peft_max_abs": max_abs_diff(hooked_out, peft_model(**inputs).logits),
            "hooked_vs_merged_max_abs": max_abs_diff(hooked_out, merged(**inputs).logits),
            "hooked_vs_base_max_abs": max_abs_diff(hooked_out, base_out),
        }

    def attached(c):
        return Case(run_base, lambda: lora.attach(model, c=c), lora.detach)

    cases = {
        "base": run_base,
        "base_again": run_base,
        "hooked_c1": attached(1.0),
        "hooked_c0": attached(0.0),
        "merged": _runner(merged, inputs),
        "peft": _runner(peft_model, inputs),
    }
    samples = interleave(cases, repeats, reference="base")
    return {
        "targets": len(lora.layout),
        "experts": lora.layout[lora.layout.names[0]].experts,
        "r": r,
        "input_shape": list(inputs["input_ids"].shape),
        "check": check,
        "cases": summarize(samples, "base", clock),
        "ratios": {key: paired_ratio(samples, a, b, clock) for key, (a, b) in RATIOS.items()},
        "ratios_min": {key: min_ratio(samples, a, b, clock) for key, (a, b) in RATIOS.items()},
        "ratios_iqr": {key: paired_iqr(samples, a, b, clock) for key, (a, b) in RATIOS.items()},
    }


def run_moe(spec: dict, tokens: tuple[int, int], repeats: int, clock: str) -> dict:
    model = small_mixtral(**spec)
    return moe_case(model, token_inputs(spec["vocab"], *tokens), repeats, clock)
