"""Run reports: report.json (every number of a run), a rich table and PNG plots.

    build_report(recipe, run_dir)   gather what the stages wrote (prune.json, eval.json,
                                    the distillation result, timings) into one dict
    write_report(run_dir, report)   report.json (atomic) + run_dir/plots/*.png
    render_table(report)            the terminal summary, original vs pruned vs distilled
    render_report(run_dir)          `amp report RUN_DIR`: re-read report.json, rewrite it
                                    (byte-identical) and regenerate the plots

The report only reads the other stages' outputs; it writes report.json and plots only.
JSON is written in one canonical form (utils.io.dumps), so re-rendering a report
reproduces the same bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..config import STAGES, Recipe
from ..evaluate import get_task, list_tasks
from ..evaluate.base import ROLES
from ..utils.io import atomic_write, deep_merge, read_json, to_jsonable, write_json
from .layout import RunDir
from .outputs import check_prune_result

PLOTS = ("hidden_sizes.png", "search_trace.png")
CURVES_PLOT = "allocation_curves.png"  # global allocation only
ROLE_TITLES = {"teacher": "original", "pruned": "pruned", "distilled": "distilled"}
PRUNE_KEYS = ("hidden_sizes", "original_sizes", "params", "mlp_params", "flops", "entropy",
              "max_steps", "round_to", "evaluations", "cache", "trace")


def _eval_sections() -> list[str]:
    return list(dict.fromkeys(get_task(t).section() for t in list_tasks()))


# ---- building and writing ------------------------------------------------------------------
def build_report(recipe: Recipe, run_dir: str | Path | RunDir,
                 seconds: dict | None = None, reused: Iterable[str] = ()) -> dict:
    """One dict with everything a run produced: the search result (prune.json), the
    evaluation (eval.json), the distillation result and the seconds per stage.

    A stage's seconds are those recorded when it ran (its output's metadata; the train
    stage's in the previous report.json), `seconds` those measured in this process;
    `reused`: the stages this process kept from an earlier run instead of running."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    prune = (rd.stage_meta("prune") or {}).get("result", {})
    if prune:  # the sizes of a search: whole numbers within the widths they were cut from
        check_prune_result(rd.prune_meta, prune)
    ev = rd.stage_meta("eval") or {}
    report: dict[str, Any] = {
        "name": recipe.name,
        "model": {"library": recipe.model.library, "name": recipe.model.name},
        "criterion": recipe.amp.criterion,
        "threshold": prune.get("threshold", recipe.amp.threshold),
        "inv_temperature": recipe.amp.inv_temperature,
    }
    report.update({k: prune[k] for k in PRUNE_KEYS if k in prune})
    # calibration and validation images: counts, folders, whole folder or a subset
    data = {"calibration": (rd.stage_meta("score") or {}).get("data"),
            "validation": (rd.stage_meta("prune") or {}).get("data")}
    if any(data.values()):
        report["data"] = data
    extra = prune.get("extra", {})
    if "budget" in extra:  # budget mode: target, every outer iteration
        report["budget"] = extra["budget"]
    report["search"] = {"measure": recipe.amp.search.measure,
                        "allocation": recipe.amp.search.allocation}
    if "allocation" in extra:  # global: curves, sizes, predicted and verified distortion
        report["allocation"] = extra["allocation"]
    if "measure" in extra:  # greedy on another measure: its values beside the entropy
        report["search"]["values"] = extra["measure"]
    if "early_decisions" in extra:  # batches each trial read
        report["search"]["early_decisions"] = extra["early_decisions"]
    report.update({k: ev[k] for k in _eval_sections() if k in ev})
    distill = rd.stage_meta("distill")
    if distill is not None:
        report["distill"] = distill
    # an earlier report's seconds, for stages whose outputs record none (train)
    try:
        earlier = (read_json(rd.report_json) or {}).get("seconds") or {}
    except ValueError:
        earlier = {}
    secs = {k: v for k, v in earlier.items() if isinstance(v, (int, float))}
    recorded = {"score": (rd.stage_meta("score") or {}).get("seconds"),
                "prune": prune.get("seconds"), "distill": (distill or {}).get("seconds"),
                "eval": ev.get("eval_seconds")}
    secs.update({k: v for k, v in recorded.items() if v is not None})
    secs.update(seconds or {})
    report["seconds"] = {k: secs[k] for k in sorted(secs, key=_stage_order)}
    report["reused"] = sorted(set(reused), key=_stage_order)
    return report


def _stage_order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def write_report(run_dir: str | Path | RunDir, report: dict) -> Path:
    """Write RUN_DIR/report.json atomically and the plots into RUN_DIR/plots."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    data = to_jsonable(report)
    path = write_json(rd.report_json, data)
    plot_report(data, rd.plots)
    return path


def update_report(run_dir: str | Path | RunDir, updates: dict) -> Path:
    """Merge `updates` into an existing report (nested dicts merged, the rest kept)."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    return write_report(rd, deep_merge(read_json(rd.report_json) or {}, to_jsonable(updates)))


def render_report(run_dir: str | Path | RunDir) -> Table:
    """Re-read RUN_DIR/report.json, rewrite it and its plots; returns the table."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    rd.check_writable()
    report = read_json(rd.report_json)
    if report is None:
        raise FileNotFoundError(f"{rd.report_json} does not exist (run the report "
                                "stage first: amp run --stage report)")
    write_report(rd, report)
    return render_table(report)


# ---- table ---------------------------------------------------------------------------------
def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _change(before: float | None, after: float | None, relative: bool = True,
            digits: int = 2) -> str:
    if before is None or after is None:
        return ""
    if relative:
        return f"{100 * (after - before) / before:+.1f}%" if before else ""
    return f"{after - before:+.{digits}f}"


ROW_DIGITS = {"pct": 2, "ratio": 3, "rate": 1}  # Row.fmt -> decimals shown


def render_table(report: dict) -> Table:
    """Original vs pruned (vs distilled) for every number the report holds."""
    roles = [r for r in ROLES if any(r in (report.get(k) or {}) for k in
                                     ("accuracy", "linear_probe", "throughput"))]
    roles = roles or ["teacher", "pruned"]
    if "pruned" not in roles:
        roles.append("pruned")
    table = Table(title=f"AMP report: {report.get('name', '?')}", title_justify="left")
    table.add_column("metric")
    for r in roles:
        table.add_column(ROLE_TITLES[r], justify="right")
    table.add_column("change (pruned)", justify="right")

    def row(label, values: dict, fmt=_pct, relative=False):
        cells = [fmt(values.get(r)) for r in roles]
        table.add_row(label, *cells, _change(values.get("teacher"), values.get("pruned"),
                                             relative))

    def before_after(d):
        d = d or {}
        out = {"teacher": d.get("before"), "pruned": d.get("after")}
        if "distilled" in roles:
            out["distilled"] = d.get("after")
        return out

    if "params" in report:
        row("vision params", before_after(report["params"]), human, True)
    if "mlp_params" in report:
        row("MLP params", before_after(report["mlp_params"]), human, True)
    if "flops" in report:
        row("FLOPs / image", before_after(report["flops"]), lambda v: human(v, "FLOP"), True)
    if report.get("original_sizes") and report.get("hidden_sizes"):
        h = {"before": sum(report["original_sizes"].values()),
             "after": sum(report["hidden_sizes"].values())}
        row("MLP hidden neurons", before_after(h), lambda v: "-" if v is None else f"{v:,}",
            True)
    if "entropy" in report:
        ent = report["entropy"]
        table.add_row("val. entropy", f"{ent.get('before', float('nan')):.4f}",
                      f"{ent.get('after', float('nan')):.4f}",
                      *([""] if "distilled" in roles else []),
                      _change(ent.get("before"), ent.get("after"), False))
    table.add_section()
    footnotes: dict[str, str] = {}  # footnote -> its mark
    for name in list_tasks():
        task = get_task(name)
        for r in task.rows(report.get(task.section()) or {}):
            if not any(r.values.get(role) is not None for role in roles):
                continue
            if r.new_section:
                table.add_section()
            digits = ROW_DIGITS[r.fmt]
            cells = ["-" if r.values.get(role) is None else f"{r.values[role]:.{digits}f}"
                     for role in roles]
            if r.text is not None:
                cells = [escape(r.text.get(role, "-")) for role in roles]
            note = r.note if r.fmt == "rate" else _change(r.values.get("teacher"),
                                                          r.values.get("pruned"), False, digits)
            label = r.label
            if r.footnote:
                mark = footnotes.setdefault(r.footnote, "*" * (len(footnotes) + 1))
                label = f"{label} {mark}"
            table.add_row(label, *cells, escape(note))
    alloc = report.get("allocation")
    notes = [f"threshold {report['threshold']:g}"] if "threshold" in report and not (
        alloc and alloc.get("mode") == "budget") else []
    if alloc:
        notes.insert(0, f"global allocation by {alloc['measure']} (predicted "
                        f"{alloc['predicted']:.4g}, verified {alloc['verified']:.4g})")
    elif (report.get("search") or {}).get("measure", "entropy_rise") != "entropy_rise":
        notes.insert(0, f"greedy search on {report['search']['measure']}")
    if "inv_temperature" in report:
        notes.append(f"1/T {report['inv_temperature']:g}")
    if "evaluations" in report:
        notes.append(trace_summary(report))
    secs, reused = report.get("seconds") or {}, report.get("reused") or []
    if secs or reused:
        # a reused stage shows the seconds it took when it ran
        cells = [f"{k} {v:.1f}" + (" (reused)" if k in reused else "") for k, v in secs.items()]
        cells += [f"{k} reused" for k in reused if k not in secs]
        notes.append("seconds: " + ", ".join(cells))
    caption = ["search: " + ", ".join(notes)] if notes else []
    caption += [f"{mark} {text}" for text, mark in footnotes.items()]
    table.caption = "\n".join(caption) if caption else None
    table.caption_justify = "left"
    return table


# ---- plots ---------------------------------------------------------------------------------
def block_label(name: str, position: int) -> str:
    """'blocks.11.mlp' -> '11' (the last integer in a module path), else the position."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    return numbers[-1] if numbers else str(position)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def _sparse_ticks(n: int, max_labels: int = 40) -> int:
    return max(1, math.ceil(n / max_labels))


def plot_hidden_sizes(report: dict, path: Path) -> Path:
    """Kept hidden size per block (filled) over the original size (outline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["original_sizes"])
    orig = [report["original_sizes"][n] for n in names]
    kept = [report["hidden_sizes"].get(n, o) for n, o in zip(names, orig, strict=True)]
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(x) + 2.5), 4.2))
    ax.bar(x, orig, width=0.8, fill=False, edgecolor="0.25", linewidth=1.2,
           label="original size")
    ax.bar(x, kept, width=0.8, color="tab:blue", alpha=0.85, label="kept after AMP")
    if len(x) <= 24:
        for xi, k, o in zip(x, kept, orig, strict=True):
            y = o if o - k < 0.06 * max(orig) else k  # above the outline when close to it
            ax.text(xi, y, f"{100 * k / o:.0f}%", ha="center", va="bottom", fontsize=8)
    step = _sparse_ticks(len(x))
    ax.set_xticks(x[::step], [block_label(n, i) for i, n in enumerate(names)][::step])
    ax.set_xlabel("transformer block")
    ax.set_ylabel("MLP hidden neurons")
    total_k, total_o = sum(kept), sum(orig)
    ax.set_title(f"{report.get('name', '')}: kept MLP hidden size per block "
                 f"({total_k:,} of {total_o:,} neurons, {100 * total_k / total_o:.1f}%)",
                 fontsize=10)
    ax.set_ylim(0, max(orig) * 1.12)
    ax.set_xlim(-0.7, len(x) - 0.3)
    # below the axes: inside, it covers the labels of the last blocks
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8,
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def trace_summary(report: dict) -> str:
    """How the trials of the search trace add up to the entropy evaluations the log counts:
    one per trial (a size already measured in its block is not measured again), plus E_val
    of the unpruned model before the first trial (the starting E_val) and E_prev measured
    again after a block kept whole."""
    trace = report.get("trace") or []
    n, evaluations = len(trace), report.get("evaluations")
    if evaluations is None:
        return f"{n} trials"
    measure = (report.get("search") or {}).get("measure", "entropy_rise")
    word = "entropy" if measure == "entropy_rise" else measure
    if "allocation" in report:
        return f"{evaluations} {word} evaluations (curve points and verification)"
    if "budget" in report:  # the trace is the chosen search's, the count covers them all
        searches = len(report["budget"].get("iterations", []))
        return (f"{n} trials of the chosen search; {evaluations} {word} evaluations in "
                f"{searches} searches")
    measured = len({(t["block"], t["size"]) for t in trace})
    references = evaluations - measured
    if references < 0:
        return f"{n} trials; {evaluations} {word} evaluations"
    terms = [f"{measured} trials" if measured == n else f"{measured} measured trials"]
    if references >= 1:
        terms.append("the starting E_val")
    if references > 1:
        terms.append(f"{references - 1} E_prev re-measured after a block kept whole")
    text = f"{n} trials; {evaluations} {word} evaluations = {' + '.join(terms)}"
    if n > measured:
        reused = n - measured
        text += f" ({reused} trial{'s' if reused > 1 else ''} reused a size measured before)"
    early = report.get("early_decisions") or (report.get("search") or {}).get(
        "early_decisions")
    if early:
        text += (f"; early decisions at confidence {early['confidence']:g}: "
                 f"{early['decided_early']} trials decided early, {early['batches_read']:,} "
                 f"of {early['batches_full_passes']:,} batches read")
    return text


def plot_search_trace(report: dict, path: Path) -> Path:
    """Entropy of every trial of the binary search, accepted vs rejected, against the
    acceptance limit E_prev + threshold; below, the candidate size of each trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = report["trace"]
    threshold = float(report.get("threshold", 0.0))
    original = report.get("original_sizes", {})
    n = len(trace)
    x = list(range(1, n + 1))
    fig, (ax, ax2) = plt.subplots(2, 1, sharex=True, figsize=(max(7.0, 0.06 * n + 6), 6.2),
                                  gridspec_kw={"height_ratios": [3, 2]})
    ref = [t["reference"] for t in trace]
    ax.step(x, ref, where="mid", color="0.5", linewidth=1, label="E_prev (reference)")
    ax.step(x, [r + threshold for r in ref], where="mid", color="tab:orange", linestyle="--",
            linewidth=1.3, label=f"acceptance limit E_prev + {threshold:g}")
    for accepted, color, marker, label in ((True, "tab:green", "o", "accepted"),
                                           (False, "tab:red", "x", "rejected")):
        pts = [(xi, t) for xi, t in zip(x, trace, strict=True) if t["accepted"] is accepted]
        ax.scatter([p[0] for p in pts], [p[1]["entropy"] for p in pts], c=color,
                   marker=marker, s=28, zorder=3, label=f"{label} ({len(pts)})")
        ax2.scatter([p[0] for p in pts],
                    [100 * p[1]["size"] / original.get(p[1]["block"], p[1]["size"])
                     for p in pts], c=color, marker=marker, s=22, zorder=3)
    ax2.plot(x, [100 * t["size"] / original.get(t["block"], t["size"]) for t in trace],
             color="0.7", linewidth=0.8, zorder=1)
    # block boundaries, labelled on top (the search runs from the last block down)
    starts = [i for i in range(n) if i == 0 or trace[i]["block"] != trace[i - 1]["block"]]
    for s in starts[1:]:
        for a in (ax, ax2):
            a.axvline(s + 0.5, color="0.85", linewidth=0.8, zorder=0)
    centres = [(s + 1 + (starts[j + 1] if j + 1 < len(starts) else n)) / 2
               for j, s in enumerate(starts)]
    labels = [block_label(trace[s]["block"], trace[s]["index"]) for s in starts]
    top = ax.secondary_xaxis("top")
    step = _sparse_ticks(len(starts), 30)
    top.set_xticks(centres[::step], labels[::step], fontsize=8)
    top.set_xlabel("block searched (last block first)")
    ax.set_ylabel("validation entropy")
    ax.set_title(f"{report.get('name', '')}: AMP binary search\n{trace_summary(report)}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    ax.grid(alpha=0.3)
    ax2.set_ylabel("candidate size\n(% of original)")
    ax2.set_xlabel("trial")
    ax2.set_ylim(0, 105)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_allocation_curves(report: dict, path: Path) -> Path:
    """Each block's distortion against its kept fraction (that block alone cut), one line
    per block, with the size the global allocation chose marked on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alloc = report["allocation"]
    curves = alloc["curves"]
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    cmap = plt.get_cmap("viridis")
    for i, (name, c) in enumerate(curves.items()):
        hidden = c["hidden"]
        xs = [s / hidden for s in c["sizes"]] + [1.0]
        ys = list(c["distortion"]) + [0.0]
        color = cmap(i / max(1, len(curves) - 1))
        label = f"block {block_label(name, c['index'])}" if len(curves) <= 16 else None
        ax.plot(xs, ys, "-o", color=color, markersize=2.5, linewidth=1.1, label=label)
        chosen = alloc["hidden_sizes"].get(name)
        if chosen is not None:
            at = (0.0 if chosen == hidden else dict(zip(c["sizes"], c["distortion"],
                                                        strict=True)).get(chosen))
            if at is not None:
                ax.plot([chosen / hidden], [at], "*", color=color, markersize=11,
                        markeredgecolor="black", markeredgewidth=0.5, zorder=4)
    ax.set_xlabel("kept fraction of the block's MLP neurons (the other blocks whole)")
    ax.set_ylabel(f"distortion ({alloc['measure']}, minus the original's)")
    ax.set_xlim(0, 1.02)
    what = (f"target {alloc['target']['measure']} {alloc['target']['value']:g}"
            if alloc.get("target") else f"threshold {alloc['threshold']:g}")
    ax.set_title(f"{report.get('name', '')}: global allocation ({what}); stars: chosen sizes"
                 f"\npredicted {alloc['predicted']:.4g} (sum of the curves), verified "
                 f"{alloc['verified']:.4g} (all blocks cut at once)", fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) <= 16:
        ax.legend(fontsize=8, ncol=2, framealpha=0.9)
    fig.tight_layout()
    return _save(fig, path)


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """The PNG plots the report has data for (hidden sizes, search trace, allocation
    curves)."""
    out_dir = Path(out_dir)
    paths = []
    if report.get("original_sizes") and report.get("hidden_sizes"):
        paths.append(plot_hidden_sizes(report, out_dir / PLOTS[0]))
    if report.get("trace"):
        paths.append(plot_search_trace(report, out_dir / PLOTS[1]))
    if (report.get("allocation") or {}).get("curves"):
        paths.append(plot_allocation_curves(report, out_dir / CURVES_PLOT))
    return paths
