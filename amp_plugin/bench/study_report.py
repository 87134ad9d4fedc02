"""study.md and the PNG plots of `amp study`, from study.json's content."""

from __future__ import annotations

from pathlib import Path

from ..utils.io import atomic_write

TEACHER_TITLES = {"demo": "demo teacher ({d} blocks)", "deep": "deeper teacher ({d} blocks)"}
CRITERION_TITLES = {"entropy": "entropy Taylor (AMP)", "one_hot": "one-hot CE Taylor (labels)",
                    "magnitude": "weight magnitude (Torch-Pruning)"}
# the columns of every table, fixed-side metrics first (study.METRICS' order)
METRIC_TITLES = {"prototype": "prototype", "original_knn": "kNN, original's index",
                 "identification": "identification", "cosine_to_original": "cosine to original",
                 "knn": "kNN re-fit", "linear": "probe re-fit"}
HOW_COLORS = {"authors": "tab:blue", "adaptive": "tab:blue", "uniform": "tab:orange",
              "global_kl": "tab:green", "global_cosine": "tab:purple",
              "global_entropy_rise": "tab:brown"}
HOW_TITLES = {"authors": "authors' rule (greedy entropy rise)", "uniform": "uniform",
              "global_kl": "global, KL", "global_cosine": "global, cosine",
              "global_entropy_rise": "global, |entropy change|"}


def _title(result: dict, teacher: str) -> str:
    c = result["config"]
    return TEACHER_TITLES[teacher].format(d=c["demo_depth"] if teacher == "demo"
                                          else c["deep_depth"])


def _pm(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{s['mean'] * scale:.{digits}f} ± {s['sd'] * scale:.{digits}f}"


def _metric(group: dict, name: str, suffix: str = "") -> str:
    """One metric cell: percentages with one decimal, the cosine with three."""
    return _pm(group.get(name + suffix), digits=3 if name == "cosine_to_original" else 1)


def _metric_header(first: list[str]) -> list[str]:
    cols = first + list(METRIC_TITLES.values())
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _metric_cells(group: dict, suffix: str = "") -> str:
    return " | ".join(_metric(group, m, suffix) for m in METRIC_TITLES)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_study(result: dict, out: Path) -> list[Path]:
    """The PNGs of the experiments that ran (study.json may hold a subset)."""
    import matplotlib

    matplotlib.use("Agg")
    s, teachers = result["summary"], result["config"]["teachers"]
    paths = []
    if any(s[t]["budget"] for t in teachers):
        paths.append(_plot_budgets(result, out))
    if any(s[t]["criterion"] for t in teachers):
        paths.append(_plot_criteria(result, out))
    if any(s[t]["val_size"] for t in teachers):
        paths.append(_plot_val_size(result, out))
    if any(r["experiment"] == "criterion" for r in result["rows"]):
        paths.append(_plot_block_sizes(result, out))
    return paths


def _plot_budgets(result: dict, out: Path) -> Path:
    """Accuracy against MLP parameters kept, one line per sizing."""
    import matplotlib.pyplot as plt

    s, teachers = result["summary"], result["config"]["teachers"]
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.5 * len(teachers), 4),
                             squeeze=False)
    axes = axes[0]
    for ax, t in zip(axes, teachers, strict=True):
        for metric, style in (("prototype", ":"), ("knn", "-.")):
            orig = (s[t]["original"].get(metric) or {}).get("mean")
            if orig is not None:
                ax.axhline(orig, color="gray", linestyle=style,
                           label=f"original, {METRIC_TITLES[metric]} {orig:.1f}")
        for i, (how, pts) in enumerate(s[t]["budget"].items()):
            color = HOW_COLORS.get(how, f"C{i + 2}")
            x = [100 * p["kept"]["mean"] for p in pts]
            for metric, style in (("prototype", "-o"), ("knn", "--s")):
                if not all(metric in p for p in pts):
                    continue
                if metric == "knn" and how not in ("authors", "adaptive", "uniform",
                                                   "global_kl"):
                    continue  # fewer lines: re-fit kNN for the main three
                ax.errorbar(x, [p[metric]["mean"] for p in pts],
                            yerr=[p[metric]["sd"] for p in pts], fmt=style, color=color,
                            capsize=3, label=f"{HOW_TITLES.get(how, how)}, {METRIC_TITLES[metric]}")
        ax.set_title(_title(result, t))
        ax.set_xlabel("MLP parameters kept (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on the digits test split (%)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Per-block sizes at equal MLP parameters, no distillation: prototype "
                 f"(original's class means) and re-fit kNN\n(mean ± sd over "
                 f"{len(result['config']['seeds'])} seeds)", y=1.06)
    return _save(fig, out / "adaptive_vs_uniform.png")


def _plot_criteria(result: dict, out: Path) -> Path:
    """Criteria: pruned and distilled accuracy at equal parameters."""
    import matplotlib.pyplot as plt

    s, teachers = result["summary"], result["config"]["teachers"]
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.5 * len(teachers), 4),
                             squeeze=False)
    axes = axes[0]
    crits = list(CRITERION_TITLES)
    shown = "prototype" if all("prototype" in s[t]["criterion"][k] for t in teachers
                               for k in crits) else "knn"
    for ax, t in zip(axes, teachers, strict=True):
        c = s[t]["criterion"]
        xs = range(len(crits))
        for off, key, label in ((-0.2, shown, "pruned"), (0.2, f"{shown}_distilled",
                                                          "distilled")):
            ax.bar([x + off for x in xs], [c[k][key]["mean"] for k in crits], 0.4,
                   yerr=[c[k][key]["sd"] for k in crits], capsize=3, label=label)
        ax.axhline(s[t]["original"][shown]["mean"], color="gray", linestyle=":",
                   label="original")
        ax.set_xticks(list(xs), [CRITERION_TITLES[k].replace(" (", "\n(") for k in crits],
                      fontsize=8)
        low = min(c[k][shown]["mean"] - c[k][shown]["sd"] for k in crits)
        ax.set_ylim(max(0, low - 10), 100)
        ax.set_title(f"{_title(result, t)}: "
                     f"{100 * result['config']['criterion_budget']:.0f}% of MLP params")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(f"{METRIC_TITLES[shown]} top-1 (%)")
    axes[-1].legend(fontsize=8, loc="lower right")
    return _save(fig, out / "criteria.png")


def _plot_val_size(result: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt

    s, teachers = result["summary"], result["config"]["teachers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for t in teachers:
        color = "tab:green" if t == "demo" else "tab:purple"
        vs = s[t]["val_size"]
        n = [v["val_images"] for v in vs]
        axes[0].errorbar(n, [100 * v["size_change"]["mean"] for v in vs],
                         yerr=[100 * v["size_change"]["sd"] for v in vs], fmt="-o",
                         color=color, capsize=3, label=_title(result, t))
        axes[1].errorbar(n, [v["knn"]["mean"] for v in vs], yerr=[v["knn"]["sd"] for v in vs],
                         fmt="-o", color=color, capsize=3, label=_title(result, t))
    axes[0].set_ylabel(f"mean |size - size at {max(n)} images| (% of hidden)")
    axes[1].set_ylabel("kNN top-1 after pruning (%)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(v) for v in n])
        ax.minorticks_off()
        ax.set_xlabel("validation images of the search")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"threshold {result['config']['threshold']:g}")
    return _save(fig, out / "val_size.png")


def _plot_block_sizes(result: dict, out: Path) -> Path:
    """AMP's per-block sizes at the criterion budget, one line per teacher and seed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in result["rows"]:
        if r["experiment"] == "criterion" and r["criterion"] == "entropy":
            sizes = list(r["hidden_sizes"].values())
            ax.plot(range(len(sizes)), sizes, "-o",
                    label=f"{r['teacher']} teacher, seed {r['seed']}",
                    color="tab:purple" if r["teacher"] == "deep" else "tab:green",
                    alpha=0.5 + 0.15 * r["seed"])
    ax.set_xlabel("block")
    ax.set_xticks(range(max((len(line.get_xdata()) for line in ax.get_lines()), default=0)))
    ax.set_ylabel("MLP neurons kept")
    ax.set_title(f"AMP sizes per block at {100 * result['config']['criterion_budget']:.0f}% "
                 "of MLP params")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "block_sizes.png")


def _deep_note(c: dict) -> str:
    if "deep" not in c["teachers"]:
        return ""
    if c["deep_teacher_seed"] is None:
        return (f"; the deeper teacher, {c['deep_epochs']} SimCLR epochs, is trained once per "
                "seed")
    return f"; one deeper teacher ({c['deep_epochs']} epochs, seed {c['deep_teacher_seed']})"


def _unreached(r: dict) -> str:
    """A note when budget mode missed the target in some seeds."""
    missed = r["seeds"] - r["reached"] if r and "reached" in r else 0
    return f" (target missed in {missed} of {r['seeds']} seeds)" if missed else ""


def study_markdown(result: dict, plots: list[Path]) -> str:
    c, s = result["config"], result["summary"]
    lines = [
        "# amp study",
        "",
        f"Seeds {c['seeds']} (each draws {c['calib_images']} calibration and the validation "
        f"images{_deep_note(c)}). 1/T {c['inv_temperature']:g}, "
        f"max_steps {c['max_steps']}, budget tolerance {c['tolerance']:.0%}, distillation "
        f"{c['distill_epochs']} epochs. Mean ± sd over seeds; accuracy on the digits test "
        f"split. Took {result['seconds']['total'] / 60:.1f} min (one single-threaded process per "
        f"seed; the seconds below add up the processes).",
        "",
        "Metrics, fixed side first: the original teacher's features stay fixed, as for a "
        "user who keeps a vector index, class prototypes or a head built with the original "
        "(a CLIP user's zero-shot keeps the original text tower the same way). *prototype*: "
        "each test image goes to the nearest class mean of the original's train features; "
        "*kNN, original's index*: the weighted kNN against the original's train features; "
        "*identification*: the model's embedding of a test image is nearest to the original's "
        "embedding of the same image among all test images; *cosine to original*: mean "
        "cosine of the two embeddings. *kNN re-fit* and *probe re-fit* use the model's own "
        "train features: they saturate and barely tell pruning methods apart.",
        "",
    ]
    for t in c["teachers"]:
        st = s[t]
        o = st["original"]
        lines += [f"## {_title(result, t)}", "",
                  *_metric_header(["model"]), f"| original | {_metric_cells(o)} |", ""]
        if st["criterion"]:
            lines += [f"### Criterion at {100 * c['criterion_budget']:.0f}% of MLP parameters "
                      "(budget mode)", "",
                      *_metric_header(["criterion", "model", "MLP params kept (%)"])]
        for k, title in CRITERION_TITLES.items() if st["criterion"] else ():
            r = st["criterion"][k]
            kept = f"{_pm(r['kept'], 100)}{_unreached(r)}"
            lines.append(f"| {title} | pruned | {kept} | {_metric_cells(r)} |")
            lines.append(f"| {title} | distilled | {kept} | {_metric_cells(r, '_distilled')} |")
        hows = list(st["budget"])
        if hows:
            lines += ["", "### Per-block sizes at equal MLP parameters (no distillation)", "",
                      *_metric_header(["budget", "sizes", "MLP params kept (%)"])]
        for i, b in enumerate(c["budgets"]):
            for how in hows:
                p = st["budget"][how][i]
                lines.append(f"| {100 * b:.0f}% | {HOW_TITLES.get(how, how)} | "
                             f"{_pm(p['kept'], 100)}{_unreached(p)} | {_metric_cells(p)} |")
        distilled = [(how, i, b) for how in hows for i, b in enumerate(c["budgets"])
                     if "prototype_distilled" in st["budget"][how][i]]
        if distilled:
            lines += ["", f"### The same after {c['distill_epochs']} epochs of distillation",
                      "", *_metric_header(["budget", "sizes", "MLP params kept (%)"])]
            for how, i, b in sorted(distilled, key=lambda x: (x[2], hows.index(x[0]))):
                p = st["budget"][how][i]
                lines.append(f"| {100 * b:.0f}% | {HOW_TITLES.get(how, how)} | "
                             f"{_pm(p['kept'], 100)} | {_metric_cells(p, '_distilled')} |")
        paired = st.get("paired") or {}
        if paired:
            lines += ["", "### Minus uniform sizes, paired by seed (mean ± sd of the "
                      "difference, points)", "",
                      *_metric_header(["budget", "sizes", "model"])]
            for how, pts in paired.items():
                for p in pts:
                    for suffix, model in (("", "pruned"), ("_distilled", "distilled")):
                        if f"prototype{suffix}" in p:
                            lines.append(f"| {100 * p['budget']:.0f}% | "
                                         f"{HOW_TITLES.get(how, how)} | {model} | "
                                         f"{_metric_cells(p, suffix)} |")
        if st["val_size"]:
            lines += ["", f"### Validation-set size (threshold {c['threshold']:g})", "",
                      *_metric_header(["val images", "size change vs largest (% of hidden)",
                                       "MLP params kept (%)"])]
        for v in st["val_size"]:
            lines.append(f"| {v['val_images']} | {_pm(v['size_change'], 100)} | "
                         f"{_pm(v['kept'], 100)} | {_metric_cells(v)} |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    lines += ["", f"Seconds: {secs}.", ""]
    return "\n".join(lines)
