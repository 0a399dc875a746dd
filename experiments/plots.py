"""``plot.png``: the frontier curves of every method side by side, and the adapter's ``c`` grid.

Top: the trait score and its shift from ``c = 0`` against coherence (every ``c`` the frontier
search measured, ``+c`` and ``−c`` branches; frontier points marked). Bottom left: the flip rate
at the frontier levels (encoders: on the opinionated sentences, at the neutral sentences'
cosine; causal LMs: on the held-out pairs). Bottom right: the adapter's trait score and
coherence against ``c``; dashed: ±calibrated ``c``.
"""

from pathlib import Path

from .report import NAMES, method_label


def plot(path: Path, result: dict, title: str, c_star: float | None, metrics: dict | None = None):
    """Write the four panels for an evaluation ``result`` (see :func:`experiments.evaluate.evaluate`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trait, key = result["trait"], result["frontier_key"]
    levels = [float(v) for v in result["frontier_levels"]]
    shift = "logit_shift" if key == "cosine" else "margin_shift"
    fig, ((left, top_right), (mid, right)) = plt.subplots(2, 2, figsize=(12, 8.4))
    for i, (name, curve) in enumerate(result["curves"].items()):
        color = f"C{i}"
        label = method_label(name, metrics)
        points = [e for lv in result["frontier"][name].values() for e in lv.values() if trait in e]
        for ax, y in ((left, trait), (top_right, shift)):
            for branch in (
                [r for r in curve if r["c"] >= 0],
                [r for r in curve if r["c"] <= 0][::-1],
            ):
                ax.plot([r[key] for r in branch], [r[y] for r in branch], "-", color=color, lw=1)
            ax.plot([e[key] for e in points], [e[y] for e in points], "o", color=color, label=label)
        flip_set = "opinionated" if key == "cosine" else None
        for sign, style in (("+", "o-"), ("-", "s--")):
            xs, ys = [1.0 if key == "cosine" else 0.0], [0.0]  # c = 0: nothing flipped
            for lv, by_sign in result["frontier"][name].items():
                entry = by_sign[sign].get(flip_set, {}) if flip_set else by_sign[sign]
                if entry.get("flip_rate") is not None:
                    xs.append(float(lv))
                    ys.append(entry["flip_rate"])
            mid.plot(xs, ys, style, color=color, label=label if sign == "+" else None)
    span = (min(levels) - 0.02, 1.002) if key == "cosine" else (0, max(levels) * 1.15)
    for ax in (left, top_right, mid):
        ax.set_xlim(span[::-1] if key == "cosine" else span)
        ax.set_xlabel(NAMES.get(key, key) + (" (neutral sentences)" if key == "cosine" else ""))
        for lv in levels:
            ax.axvline(lv, color="grey", lw=0.5, ls=":")
    left.set_ylabel(NAMES.get(trait, trait))
    left.set_title("frontier: trait at equal coherence")
    left.legend(fontsize=7)
    top_right.set_ylabel(NAMES.get(shift, shift))
    top_right.set_title("frontier: shift from c = 0 at equal coherence")
    mid.set_ylabel("flip rate" + (" (opinionated sentences)" if key == "cosine" else ""))
    mid.set_title("flips at the frontier levels (o: +c, s: -c)")
    mid.legend(fontsize=7)
    rows = result["rows"]
    cs = [r["c"] for r in rows]
    right.plot(cs, [r[trait] for r in rows], "o-", color="C0", label=NAMES.get(trait, trait))
    twin = right.twinx()
    twin.plot(cs, [r[key] for r in rows], "s-", color="C7", label=NAMES.get(key, key))
    right.set_xlabel("c")
    right.set_ylabel(NAMES.get(trait, trait))
    twin.set_ylabel(NAMES.get(key, key))
    right.set_title("adapter against c (dashed: ±calibrated c)")
    if c_star is not None:
        for s in (c_star, -c_star):
            right.axvline(s, color="red", lw=0.8, ls="--")
    for ax in (left, top_right, mid, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
