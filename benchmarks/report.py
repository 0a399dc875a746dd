"""The issue's targets checked against one run, and the markdown table for the README."""

import json
from pathlib import Path


def _get(results: dict, *path):
    node = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _label(entry: str, fwd: dict) -> str:
    """``"minilm"`` → ``"minilm"``; entries at other thread counts say so."""
    model = fwd.get("model", entry)
    threads = fwd.get("threads")
    return model if entry == model else f"{model} ({threads} threads, {fwd.get('clock')})"


def _iqr(fwd: dict, key: str) -> str:
    band = (fwd.get("ratios_iqr") or {}).get(key)
    return "–" if band is None else f"{band[0]:.3f}–{band[1]:.3f}"


def _target(name: str, goal: str, value, ok, note: str = "") -> dict:
    return {"target": name, "goal": goal, "value": value, "met": ok, "note": note}


def targets(results: dict) -> list[dict]:
    """Every target of the issue that this run measured, with its value and whether it is met."""
    out = []
    for entry, fwd in (results.get("forward") or {}).items():
        if entry.endswith("decode"):
            continue  # informational: the targets are for batched forwards
        label = _label(entry, fwd)
        r, rmin = fwd["ratios"], fwd.get("ratios_min", {})
        noise = abs(r["base_again_vs_base"] - 1.0)
        out.append(
            _target(
                f"{label}: hooked LoRA r=16 (c=1) / PEFT LoRA r=16",
                "<= 0.85",
                r["hooked_c1_vs_peft"],
                r["hooked_c1_vs_peft"] <= 0.85,
                f"per-round IQR {_iqr(fwd, 'hooked_c1_vs_peft')}, ratio of minima "
                f"{_x(rmin.get('hooked_c1_vs_peft'))}; FLOP floor of any "
                f"unmerged rank-16 delta: {fwd['flop_floor_vs_peft']:.3f}× PEFT "
                f"({fwd['flop_floor_vs_base']:.3f}× base)",
            )
        )
        out.append(
            _target(
                f"{label}: hooked at c=0 / base",
                "<= 1.03",
                r["hooked_c0_vs_base"],
                r["hooked_c0_vs_base"] <= 1.03,
                f"per-round IQR {_iqr(fwd, 'hooked_c0_vs_base')}, ratio of minima "
                f"{_x(rmin.get('hooked_c0_vs_base'))}; noise floor "
                f"|base again / base − 1| = {noise:.3f}",
            )
        )
        out.append(
            _target(
                f"{label}: merged / base",
                "<= 1.02 (within noise)",
                r["merged_vs_base"],
                r["merged_vs_base"] <= 1.02 + noise,
                f"per-round IQR {_iqr(fwd, 'merged_vs_base')}, ratio of minima "
                f"{_x(rmin.get('merged_vs_base'))}; noise floor {noise:.3f}",
            )
        )
    moe = results.get("moe")
    if moe:
        r, noise = moe["ratios"], abs(moe["ratios"]["base_again_vs_base"] - 1.0)
        rows = (
            (
                "hooked LoRA on fused experts (c=1) / PEFT target_parameters",
                "hooked_c1_vs_peft",
                1.0,
            ),
            ("hooked at c=0 / base", "hooked_c0_vs_base", 1.03),
            ("merged / base", "merged_vs_base", 1.02 + noise),
        )
        for what, key, goal in rows:
            out.append(
                _target(
                    f"small Mixtral ({moe['experts']} experts, r={moe['r']}): {what}",
                    f"<= {goal:.2f}",
                    r[key],
                    r[key] <= goal,
                    f"per-round IQR {_iqr(moe, key)}, ratio of minima "
                    f"{_x(moe['ratios_min'].get(key))}; noise floor {noise:.3f}",
                )
            )
    for entry, hist in (results.get("history") or {}).items():
        model = _label(entry, hist)
        k = max(hist["rounds"])
        rank = k * hist["r_per_round"]
        r = hist["ratios"]
        sep = r[f"history_{k}_vs_separate_{k}"]
        added = r[f"history_{k}_vs_separate_{k}_added_time"]
        out.append(
            _target(
                f"{model}: HistoryBake {k} rounds / the {k} adapters attached separately",
                "<= 0.6",
                sep,
                sep <= 0.6,
                f"ratio of minima {_x(r.get(f'history_{k}_vs_separate_{k}_min'))}; "
                f"added time over base: {added:.3f}",
            )
        )
        one = r[f"history_{k}_vs_single_r{rank}"]
        out.append(
            _target(
                f"{model}: HistoryBake {k} rounds / one adapter of rank {rank}",
                "<= 1.3",
                one,
                one <= 1.3,
                f"ratio of minima {_x(r.get(f'history_{k}_vs_single_r{rank}_min'))}; added "
                f"time over base: {r[f'history_{k}_vs_single_r{rank}_added_time']:.3f}",
            )
        )
    svd = _get(results, "pissa_svd", "shapes")
    if svd:
        key = "2048x2048" if "2048x2048" in svd else next(iter(svd))
        s = svd[key]
        agree = min(s["agreement_u"], s["agreement_vh"])
        note = "" if key == "2048x2048" else f"measured at {key} (this mode skips 2048x2048)"
        out.append(
            _target(
                f"s_only randomized SVD speed-up over full SVD ({key})",
                ">= 10",
                s["speedup_randomized_vs_full"],
                s["speedup_randomized_vs_full"] >= 10,
                note,
            )
        )
        out.append(
            _target(
                f"chosen-subspace agreement, randomized vs full ({key})",
                ">= 0.99",
                agree,
                agree >= 0.99,
                "min over U and Vh of the mean squared cosine of the principal angles",
            )
        )
    comp = _get(results, "compile")
    if comp:
        out.append(
            _target(
                f"torch.compile ({comp['backend']}) recompilations when only c changes (set_coeff)",
                "0",
                comp["recompiles_set_coeff"],
                comp["recompiles_set_coeff"] == 0,
                f"with-block form: {comp['recompiles_with_block']}; per-sample values: "
                f"{comp['recompiles_per_sample_values']}",
            )
        )
    cal = _get(results, "calibration")
    if cal:
        ratio = cal["nbytes_last_over_first"]
        counts = list(cal["tokens"])
        past = cal["nbytes_last_over_max_rows_point"]
        out.append(
            _target(
                f"calibration memory, {counts[-1]} / {counts[0]} tokens",
                "within ±10%",
                ratio,
                abs(ratio - 1.0) <= 0.10,
                f"after the {cal['max_rows']}-row reservoir is full: {past:.3f}"
                if past is not None
                else "",
            )
        )
    ddp = _get(results, "ddp", "clocks", "wall")
    if ddp:
        band = ddp["hooked_vs_peft_iqr"]
        out.append(
            _target(
                "2-process DDP training step: hooked LoRA r=16 / PEFT LoRA r=16",
                "<= 1.0",
                ddp["hooked_vs_peft"],
                ddp["hooked_vs_peft"] <= 1.0,
                f"wall time on rank 0; per-round IQR {band[0]:.3f}–{band[1]:.3f}, ratio of minima "
                f"{_x(ddp['hooked_vs_peft_min'])}; process CPU time "
                f"{results['ddp']['clocks']['cpu']['hooked_vs_peft']:.3f}",
            )
        )
    return out


# ---------------------------------------------------------------------------- notes
def _describe(entry: str, f: dict) -> str:
    model = MODEL_NAMES.get(f.get("model", entry), entry)
    shape = "×".join(str(d) for d in f.get("input_shape", []))
    threads = f.get("threads")
    return f"{model} {shape}, {threads} thread{'s' if threads != 1 else ''} ({f.get('clock')})"


def notes(results: dict) -> list[str]:
    """Plain-language reading of one run, with every number taken from it."""
    out = []
    for entry, f in (results.get("forward") or {}).items():
        r = f["ratios"]
        out.append(
            f"{_describe(entry, f)}: hooked c=1 {r['hooked_c1_vs_base']:.3f}× base, PEFT "
            f"{r['peft_vs_base']:.3f}× base, so hooked = {r['hooked_c1_vs_peft']:.3f}× PEFT. The "
            f"rank-16 delta's own FLOPs are {100 * (f['flop_floor_vs_base'] - 1):.1f}% of the base's "
            f"linear layers: no unmerged adapter can go below {f['flop_floor_vs_peft']:.3f}× PEFT "
            f"here. Base measured twice: {r['base_again_vs_base']:.3f}."
        )
    hist = results.get("history") or {}
    for entry, h in hist.items():
        k = max(h["rounds"])
        r = h["ratios"]
        rank = k * h["r_per_round"]
        out.append(
            f"History, {_describe(entry, h)}: {k} rounds of rank {h['r_per_round']} do exactly the "
            f"arithmetic of one adapter of rank {rank} "
            f"({r[f'history_{k}_vs_single_r{rank}']:.3f}× its time) and of the {k} "
            f"adapters attached separately, so a history can only save their per-adapter "
            f"overhead (kernel launches, {k - 1} extra passes over each layer's output). "
            f"Measured: history / separate = {r[f'history_{k}_vs_separate_{k}_added_time']:.3f} "
            f"in added time over base, {r[f'history_{k}_vs_separate_{k}']:.3f} in total time."
        )
    cal = results.get("calibration")
    if cal:
        past = cal["nbytes_last_over_max_rows_point"]
        out.append(
            "Calibration: the statistics are a Gram matrix and running sums (fixed size) plus a "
            f"reservoir sample of at most {cal['max_rows']} rows per target; below that many tokens "
            "the reservoir is still filling, which is all of the growth from the first point "
            f"({cal['nbytes_last_over_first']:.3f}×); from {cal['max_rows']} tokens on the memory is "
            f"flat ({past:.3f}× to the last point)."
            if past is not None
            else "Calibration: see the table."
        )
    ck = results.get("checkpoint")
    if ck:
        c = ck["cases"]
        clock = results["settings"]["clock"]
        fp = c["fingerprints"][clock]["median_ms"]
        v1 = c.get("fingerprints_v1", c["fingerprints"])[clock]["median_ms"]
        save, load = c["modlora_save"][clock]["median_ms"], c["modlora_load"][clock]["median_ms"]
        out.append(
            f"Checkpoint: the sampled fingerprints of the {ck['targets']} base weights take "
            f"{fp:.1f} ms ({100 * fp / load:.0f}% of a load, {load:.1f} ms); a save also writes "
            f"the full v1 fingerprints for release 0.1.0's reader ({v1:.1f} ms, "
            f"{100 * v1 / save:.0f}% of a save, {save:.1f} ms). The rest is reading and hashing "
            "the file, validation, the atomic write (fsync) and rebuilding the adapter."
        )
    if any(f.get("threads", 1) > 1 for f in (results.get("forward") or {}).values()):
        m = results["machine"]
        out.append(
            "Two-thread rows are wall time: on a shared 2-core machine they move with the load "
            f"(load average {m['load_average_1m_at_start']} at start, "
            f"{m.get('load_average_1m_at_end', '?')} at end); PEFT's extra kernels cost most there."
        )
    return out


# ---------------------------------------------------------------------------- markdown
def _ms(case: dict, clock: str) -> str:
    return f"{case[clock]['median_ms']:.1f}"


def _x(value) -> str:
    return "–" if value is None else f"{value:.3f}"


MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2", "llama": "Llama-shaped"}


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    clock = s["clock"]
    clock_name = "process CPU time" if clock == "cpu" else "wall time"
    lines = [
        "## Performance",
        "",
        f"`python -m benchmarks.run{' --quick' if s['mode'] == 'quick' else ''}` "
        f"({s['mode']} mode, {results['date']}) on {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']} ({m['cpu_capability']}), {m['torch_threads']} torch thread(s), "
        f"transformers {m['transformers']}, peft {m['peft']}. One process; cases interleaved "
        f"round-robin; medians of {clock_name}; ratios are medians of per-round ratios. "
        f"Load average at start {m['load_average_1m_at_start']} (a shared machine: CPU time "
        "is used because wall time there measures the scheduler). Total run "
        f"{results['seconds']:.0f} s.",
        "",
        "### Targets",
        "",
        "| target | goal | measured | met | note |",
        "|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(
            f"| {t['target']} | {t['goal']} | {shown} | {'yes' if t['met'] else '**no**'} "
            f"| {t['note']} |"
        )
    fwd = results.get("forward", {})
    if fwd:
        lines += [
            "",
            "### 1. Forward pass, LoRA r=16 on every linear layer (ms, × base)",
            "",
            "Targets per model: "
            + ", ".join(
                f"{MODEL_NAMES.get(f.get('model', k), k)} {f['targets']}"
                for k, f in fwd.items()
                if not k.endswith(("decode", "threads"))
            )
            + ". Hooked and PEFT hold the same factors (B nonzero); merged = modlora.merge at c=1.",
            "",
            "| model | input | threads, clock | base | base again | hooked c=1 | hooked c=0 "
            "| merged | PEFT LoRA | hooked / PEFT | FLOP floor (× base) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, f in fwd.items():
            c, r = f["cases"], f["ratios"]
            fc = f.get("clock", clock)
            cells = [
                f"{_ms(c['base'], fc)}",
                f"{_ms(c['base_again'], fc)} ({r['base_again_vs_base']:.3f})",
                f"{_ms(c['hooked_c1'], fc)} ({r['hooked_c1_vs_base']:.3f})",
                f"{_ms(c['hooked_c0'], fc)} ({r['hooked_c0_vs_base']:.3f})",
                f"{_ms(c['merged'], fc)} ({r['merged_vs_base']:.3f})",
                f"{_ms(c['peft'], fc)} ({r['peft_vs_base']:.3f})",
                f"**{r['hooked_c1_vs_peft']:.3f}**",
                f"{f['flop_floor_vs_base']:.3f}",
            ]
            shape = "×".join(str(d) for d in f["input_shape"])
            model = MODEL_NAMES.get(f.get("model", key), key)
            lines.append(
                f"| {model} | {shape} | {f.get('threads', '?')}, {fc} | " + " | ".join(cells) + " |"
            )
    hist = results.get("history", {})
    if hist:
        lines += [
            "",
            "### 2. HistoryBake vs the same rounds attached separately vs one adapter of the same "
            "total rank (ms)",
            "",
            "| model | rounds (r=16 each) | history | separate | single | history / separate "
            "| history / single | added time: history / separate | added time: history / single |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, h in hist.items():
            c, r = h["cases"], h["ratios"]
            hc = h.get("clock", clock)
            label = MODEL_NAMES.get(h.get("model", key), key)
            if key != h.get("model", key):
                label += f" ({h['threads']} threads, {hc})"
            for k in h["rounds"]:
                one = f"single_r{k * h['r_per_round']}"
                lines.append(
                    f"| {label} | {k} | {_ms(c[f'history_{k}'], hc)} "
                    f"| {_ms(c[f'separate_{k}'], hc)} | {_ms(c[one], hc)} (rank "
                    f"{k * h['r_per_round']}) | {r[f'history_{k}_vs_separate_{k}']:.3f} "
                    f"| {r[f'history_{k}_vs_{one}']:.3f} "
                    f"| {_x(r[f'history_{k}_vs_separate_{k}_added_time'])} "
                    f"| {_x(r[f'history_{k}_vs_{one}_added_time'])} |"
                )
    per = results.get("per_sample", {})
    if per:
        lines += [
            "",
            "### 3. Per-sample c: one batch with +C and −C rows vs two forwards (ms)",
            "",
            "| model | mode | rows | base | scalar c | per-sample c | two forwards "
            "| per-sample / two forwards | per-sample / scalar |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, p in per.items():
            c, r = p["cases"], p["ratios"]
            lines.append(
                f"| {MODEL_NAMES.get(p.get('model', key), key)} | {p['mode']} | {p['rows']} "
                f"| {_ms(c['base'], clock)} | {_ms(c['scalar_c'], clock)} "
                f"| {_ms(c['per_sample_c'], clock)} | {_ms(c['two_forwards'], clock)} "
                f"| **{r['per_sample_vs_two_forwards']:.3f}** | {r['per_sample_vs_scalar_c']:.3f} |"
            )
    svd = results.get("pissa_svd")
    if svd:
        lines += [
            "",
            f"### 4. PiSSA s_only construction: top-{svd['r']} SVD, randomized vs full",
            "",
            f"Weights: {svd['weights']} (σ_r / σ_r+1 = "
            f"{svd['profile_sigma_r_over_sigma_r_plus_1']:.3f}).",
            "",
            "| weight | full (ms) | randomized (ms) | speed-up | agreement U | agreement Vh "
            "| max rel. error of S |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, v in svd["shapes"].items():
            c = v["cases"]
            lines.append(
                f"| {key} | {_ms(c['full'], clock)} | {_ms(c['randomized'], clock)} "
                f"| **{v['speedup_randomized_vs_full']:.1f}×** | {v['agreement_u']:.4f} "
                f"| {v['agreement_vh']:.4f} | {v['max_rel_error_s']:.1e} |"
            )
    cal = results.get("calibration")
    if cal:
        lines += [
            "",
            f"### 5. Calibration memory vs tokens ({cal['targets']} targets, d_in "
            f"{cal['d_in']}, reservoir {cal['max_rows']} rows)",
            "",
            "| tokens | Calibration.nbytes() | live tensor bytes kept | Python heap peak | CPU s |",
            "|---|---|---|---|---|",
        ]
        for row in cal["tokens"].values():
            lines.append(
                f"| {row['tokens']} | {row['nbytes'] / 2**20:.2f} MiB | "
                f"{row['live_tensor_bytes'] / 2**20:.2f} MiB | {row['python_heap_peak'] / 2**10:.0f} KiB "
                f"| {row['cpu_seconds']:.2f} |"
            )
    comp = results.get("compile")
    if comp:
        lines += [
            "",
            f"### 6. torch.compile (backend {comp['backend']})",
            "",
            f"Graphs compiled on the first call: {comp['graphs_first_call']}. Recompilations over "
            f"{len(comp['coefficients']) - 1} changes of scalar c with `set_coeff`: "
            f"**{comp['recompiles_set_coeff']}**; switching to a per-sample c: "
            f"{comp['graphs_on_switch_to_per_sample']} (a new input shape); then new per-sample "
            f"values: {comp['recompiles_per_sample_values']}; `with adapter(model, c)` blocks "
            f"(hooks re-registered each time): {comp['recompiles_with_block']}. Max |compiled − "
            f"eager| = {comp['compiled_vs_eager_max_abs']:.1e}.",
        ]
    ck = results.get("checkpoint")
    if ck:
        c, r = ck["cases"], ck["ratios"]
        lines += [
            "",
            f"### 7. Checkpoint with {ck['targets']} targets ({ck['tensors']} tensors, "
            f"{ck['modlora_bytes'] / 2**20:.1f} MiB) vs raw safetensors (ms)",
            "",
            "| | modlora | raw safetensors | ratio (CPU) | ratio (wall) |",
            "|---|---|---|---|---|",
            f"| save | {_ms(c['modlora_save'], clock)} | {_ms(c['raw_save'], clock)} "
            f"| {r['save_vs_raw_cpu']:.2f} | {r['save_vs_raw_wall']:.2f} |",
            f"| load | {_ms(c['modlora_load'], clock)} | {_ms(c['raw_load'], clock)} "
            f"| {r['load_vs_raw_cpu']:.2f} | {r['load_vs_raw_wall']:.2f} |",
            "",
            f"Save and load fingerprint every target's base weight by samples: one pass over "
            f"the {ck['targets']} weights takes {_ms(c['fingerprints'], clock)} ms; the full v1 "
            f"fingerprints a save adds for the previous release's reader take "
            f"{_ms(c.get('fingerprints_v1', c['fingerprints']), clock)} ms.",
        ]
    ddp = results.get("ddp")
    if ddp:
        shape = "×".join(str(d) for d in ddp["per_rank_input_shape"])
        spec = ddp["model"]
        lines += [
            "",
            f"### 8. DDP training step, {ddp['world_size']} processes ({ddp['backend']}, "
            f"{ddp['threads_per_rank']} thread each), LoRA r={ddp['r']} (ms, rank 0)",
            "",
            f"Llama-shaped, hidden {spec['hidden']}, {spec.get('layers', 2)} layers; {shape} "
            "tokens per rank; zero_grad + forward + backward (all-reduce) + SGD step. After one "
            "step from the same factors, hooked and PEFT factors differ by at most "
            f"{ddp['check']['factors_after_one_step_max_abs']:.1e}.",
            "",
            "| clock | hooked LoRA | PEFT LoRA | hooked / PEFT | per-round IQR | ratio of minima |",
            "|---|---|---|---|---|---|",
        ]
        for clock, d in ddp["clocks"].items():
            c, band = d["cases"], d["hooked_vs_peft_iqr"]
            lines.append(
                f"| {clock} | {_ms(c['hooked'], clock)} | {_ms(c['peft'], clock)} "
                f"| **{d['hooked_vs_peft']:.3f}** | {band[0]:.3f}–{band[1]:.3f} "
                f"| {d['hooked_vs_peft_min']:.3f} |"
            )
    notes = results.get("notes") or []
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "latest.json", out_dir / "latest.md"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path
