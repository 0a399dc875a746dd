"""Forward-pass cases: hooked LoRA vs base / merged / PEFT (1), history (2), per-sample c (3)."""

import torch
from torch import nn

import modlora as ml

from .common import (
    Case,
    adapter_flops,
    clone,
    interleave,
    linear_flops,
    max_abs_diff,
    merged_twin,
    min_ratio,
    overhead_ratio,
    paired_iqr,
    paired_ratio,
    peft_twin,
    signed_lora,
    summarize,
)


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _runner(model: nn.Module, inputs: dict, grad: bool = False):
    if grad:

        def run():
            loss = _output(model(**inputs)).float().pow(2).mean()
            if loss.requires_grad:  # the base model alone is frozen: a grad-mode forward only
                loss.backward()

        return run

    def run():
        with torch.no_grad():
            return model(**inputs)

    return run


def _tokens(inputs: dict) -> int:
    return inputs["input_ids"].numel()


def _warm(model: nn.Module, inputs: dict):
    """A one-row, few-token forward: fills the hooks' folded-factor caches outside the timing,
    so a timed call is a steady-state call (an adapter is attached once, then run many times)."""
    small = {k: v[:1, :8] for k, v in inputs.items()}

    def warm():
        with torch.no_grad():
            model(**small)

    return warm


def _attach(adapters_and_cs, model: nn.Module, warm_inputs: dict | None = None):
    """``setup`` of a timed case: attach every adapter at its ``c`` (then warm the caches)."""
    warm = _warm(model, warm_inputs) if warm_inputs is not None else None

    def setup():
        for adapter, c in adapters_and_cs:
            adapter.attach(model, c=c)
        if warm is not None:
            warm()

    return setup


def _detach(adapters):
    def teardown():
        for adapter in adapters:
            adapter.detach()

    return teardown


RATIOS = {
    "base_again_vs_base": ("base_again", "base"),
    "hooked_c1_vs_base": ("hooked_c1", "base"),
    "hooked_c0_vs_base": ("hooked_c0", "base"),
    "merged_vs_base": ("merged", "base"),
    "peft_vs_base": ("peft", "base"),
    "hooked_c1_vs_peft": ("hooked_c1", "peft"),
}


def forward_case(model: nn.Module, inputs: dict, repeats: int, clock: str, r: int = 16) -> dict:
    """Case 1: base (twice), hooked at c=1 and c=0, merged, PEFT LoRA on the same targets."""
    lora = signed_lora(model, r=r)
    peft_model = peft_twin(clone(model), lora)
    merged, merged_by = merged_twin(clone(model), lora, c=1.0)
    run_base = _runner(model, inputs)

    with torch.no_grad():
        base_out = _output(model(**inputs))
        with lora(model, c=1.0):
            hooked_out = _output(model(**inputs))
        peft_out = _output(peft_model(**inputs))
        merged_out = _output(merged(**inputs))
    check = {
        "hooked_vs_peft_max_abs": max_abs_diff(hooked_out, peft_out),
        "hooked_vs_merged_max_abs": max_abs_diff(hooked_out, merged_out),
        "hooked_vs_base_max_abs": max_abs_diff(hooked_out, base_out),
    }

    cases = {
        "base": run_base,
        "base_again": run_base,
        "hooked_c1": Case(run_base, _attach([(lora, 1.0)], model, inputs), lora.detach),
        "hooked_c0": Case(run_base, _attach([(lora, 0.0)], model, inputs), lora.detach),
        "merged": _runner(merged, inputs),
        "peft": _runner(peft_model, inputs),
    }
    samples = interleave(cases, repeats, reference="base")
    tokens = _tokens(inputs)
    base_flops = linear_flops(model, tokens)
    floor = 1.0 + adapter_flops(lora, tokens) / base_flops
    result = {
        "targets": len(lora.layout),
        "r": r,
        "input_shape": list(inputs["input_ids"].shape),
        "merged_by": merged_by,
        "check": check,
        "cases": summarize(samples, "base", clock),
        "ratios": {key: paired_ratio(samples, a, b, clock) for key, (a, b) in RATIOS.items()},
        "ratios_min": {key: min_ratio(samples, a, b, clock) for key, (a, b) in RATIOS.items()},
        "ratios_iqr": {key: paired_iqr(samples, a, b, clock) for key, (a, b) in RATIOS.items()},
        "flop_floor_vs_base": floor,
    }
    result["flop_floor_vs_peft"] = floor / result["ratios"]["peft_vs_base"]
    del peft_model, merged
    return result


def history_case(
    model: nn.Module, inputs: dict, repeats: int, clock: str, rounds=(1, 4, 8), r: int = 16
) -> dict:
    """Case 2: HistoryBake of k rounds vs the k adapters attached separately vs one of rank k·r."""
    k_max = max(rounds)
    adapters = [signed_lora(model, r=r, seed=100 + i) for i in range(k_max)]
    coeffs = [1.0, -0.5, 0.75, 1.5, -1.0, 0.25, 2.0, -0.3][:k_max] + [1.0] * max(0, k_max - 8)
    run = _runner(model, inputs)
    cases: dict = {"base": run}
    checks = {}
    for k in rounds:
        pairs = list(zip(adapters[:k], coeffs[:k], strict=True))
        hist = ml.HistoryBake(model, pairs, attach=False)
        single = signed_lora(model, r=k * r, seed=200 + k)

        attach_all, detach_all = _attach(pairs, model), _detach([a for a, _ in pairs])
        with torch.no_grad():
            attach_all()
            separate_out = _output(model(**inputs))
            detach_all()
            with hist(model, c=1.0):
                hist_out = _output(model(**inputs))
        checks[f"history_{k}_vs_separate_{k}_max_abs"] = max_abs_diff(hist_out, separate_out)
        cases[f"history_{k}"] = Case(run, _attach([(hist, 1.0)], model, inputs), hist.detach)
        cases[f"separate_{k}"] = Case(run, _attach(pairs, model, inputs), detach_all)
        cases[f"single_r{k * r}"] = Case(
            run, _attach([(single, 1.0)], model, inputs), single.detach
        )
    samples = interleave(cases, repeats, reference="base")
    ratios = {}
    for k in rounds:
        h, s, one = f"history_{k}", f"separate_{k}", f"single_r{k * r}"
        ratios[f"history_{k}_vs_separate_{k}"] = paired_ratio(samples, h, s, clock)
        ratios[f"history_{k}_vs_single_r{k * r}"] = paired_ratio(samples, h, one, clock)
        ratios[f"history_{k}_vs_separate_{k}_min"] = min_ratio(samples, h, s, clock)
        ratios[f"history_{k}_vs_single_r{k * r}_min"] = min_ratio(samples, h, one, clock)
        ratios[f"history_{k}_vs_separate_{k}_added_time"] = overhead_ratio(
            samples, h, s, "base", clock
        )
        ratios[f"history_{k}_vs_single_r{k * r}_added_time"] = overhead_ratio(
            samples, h, one, "base", clock
        )
    return {
        "rounds": list(rounds),
        "r_per_round": r,
        "input_shape": list(inputs["input_ids"].shape),
        "check": checks,
        "cases": summarize(samples, "base", clock),
        "ratios": ratios,
    }


def per_sample_case(
    model: nn.Module, inputs: dict, repeats: int, clock: str, c: float = 1.5, grad: bool = False
) -> dict:
    """Case 3: one forward of ``[x; x]`` with ``c = [+C…, −C…]`` vs two forwards of ``x``.

    Both sides process the same rows; ``grad=True`` times forward + backward (the ±c training
    pattern) instead of a no-grad forward.
    """
    half = {k: v[: v.shape[0] // 2] for k, v in inputs.items()}
    both = {k: torch.cat([v, v]) for k, v in half.items()}  # (2 · half, seq)
    n = half["input_ids"].shape[0]
    lora = signed_lora(model, r=16, seed=7)
    if grad:
        lora.train()
    per_sample_c = torch.tensor([c] * n + [-c] * n)
    run_both = _runner(model, both, grad)
    run_half = _runner(model, half, grad)

    def two_forwards():
        lora.set_coeff(c)
        run_half()
        lora.set_coeff(-c)
        run_half()

    with torch.no_grad():
        lora.attach(model, c=per_sample_c)
        one = _output(model(**both))
        lora.set_coeff(c)
        plus = _output(model(**half))
        lora.set_coeff(-c)
        minus = _output(model(**half))
        lora.detach()
    check = {"per_sample_vs_two_forwards_max_abs": max_abs_diff(one, torch.cat([plus, minus]))}

    cases = {
        "base": run_both,
        "scalar_c": Case(run_both, _attach([(lora, c)], model, both), lora.detach),
        "per_sample_c": Case(run_both, _attach([(lora, per_sample_c)], model), lora.detach),
        "two_forwards": Case(two_forwards, _attach([(lora, c)], model), lora.detach),
    }
    samples = interleave(cases, repeats, reference="base")
    for p in lora.parameters():
        p.grad = None
    return {
        "mode": "forward+backward" if grad else "no-grad forward",
        "rows": 2 * n,
        "input_shape": list(both["input_ids"].shape),
        "check": check,
        "cases": summarize(samples, "base", clock),
        "ratios": {
            "per_sample_vs_two_forwards": paired_ratio(
                samples, "per_sample_c", "two_forwards", clock
            ),
            "per_sample_vs_scalar_c": paired_ratio(samples, "per_sample_c", "scalar_c", clock),
        },
    }
