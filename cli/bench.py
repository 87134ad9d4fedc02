"""amp bench search / throughput: speed and memory goals live here, not in tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .common import Command, Group, user_errors

bench = typer.Typer(help="Benchmarks: search speed and pruned-model throughput.",
                    no_args_is_help=True, cls=Group)


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


def _write(path: Path | None, data: dict) -> None:
    if path is not None:
        from amp_plugin.utils.io import write_json

        write_json(Path(path), data)


@bench.command("search", cls=Command)
def search_cmd(
    layers: int = typer.Option(12, help="transformer blocks"),
    width: int = typer.Option(384, help="embedding width (MLP hidden = 4x)"),
    val_images: int = typer.Option(64, help="validation images"),
    batch_size: int = typer.Option(None, help="validation batch (default: one batch)"),
    cache_mib: float = typer.Option(None, help="cache budget of the budgeted run (default: "
                                    "a quarter of the full cache)"),
    repeats: int = typer.Option(2, min=1, help="cached runs alternate this often; fastest kept"),
    image_size: int = typer.Option(32, help="input resolution"),
    patch_size: int = typer.Option(8, help="patch size"),
    threshold: float = typer.Option(2e-3, help="entropy threshold"),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu, cuda, or auto"),
    dtype: str = typer.Option("float32", help="float32, bf16 or fp16"),
    json_out: Path = typer.Option(None, "--json", help="also write the numbers here"),
    confidence: list[float] = typer.Option(None, help=(
        "instead: count the image-block forwards of early decisions at this confidence "
        "(repeatable) against the exact search, on --seeds models")),
    seeds: int = typer.Option(1, min=1, help="with --confidence: models seed, seed+1, ..."),
    threads: int = typer.Option(None, min=1, help="torch CPU threads (default: torch's)"),
    pair_with: list[str] = typer.Option(None, help=(
        "with --confidence: nearest (each trial paired with the nearest size of its block "
        "read in full; the default) or start (always the block's start); repeatable")),
    reference: list[str] = typer.Option(None, help=(
        "with --confidence: exact (each block's accepted size read on every batch; the "
        "default) or as-needed (E_prev's values only on the batches trials read); "
        "repeatable")),
    orders: int = typer.Option(0, min=0, help=(
        "with --confidence: also replay each option in this many batch orders on a "
        "recording of the exact search (order 0 is the runs' own)")),
) -> None:
    """Reference procedure vs AMPPruner on one model: same sizes, wall times, ratio; with
    --confidence, the counted cost of early decisions and whether the sizes stay exact."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if confidence:
        bad = [c for c in confidence if not 0 < c < 1]
        if bad:
            raise typer.BadParameter(f"{bad[0]} is not in (0, 1)", param_hint="--confidence")
        bad = [p for p in pair_with or () if p not in ("nearest", "start")]
        if bad:
            raise typer.BadParameter(f"{bad[0]!r}: expected nearest or start",
                                     param_hint="--pair-with")
        bad = [e for e in reference or () if e not in ("exact", "as-needed")]
        if bad:
            raise typer.BadParameter(f"{bad[0]!r}: expected exact or as-needed",
                                     param_hint="--reference")
        _early(layers, width, val_images, batch_size, confidence, seeds, seed, image_size,
               patch_size, threshold, device, dtype, json_out, tuple(pair_with or ("nearest",)),
               tuple(reference or ("exact",)), orders)
        return
    from amp_plugin.bench.search import bench_search

    r = bench_search(layers, width, val_images, image_size, patch_size, threshold, seed=seed,
                     batch_size=batch_size, cache_mib=cache_mib, repeats=repeats, device=device,
                     dtype=dtype)
    mib = 2**20
    g = r["global"]
    Console().print(_table(f"search: {layers} blocks, width {width}, {r['val_images']} images "
                           f"in {r['val_batches']} batches", [
        ("identical hidden sizes (reference, full cache, budget)",
         f"{r['identical_sizes']} ({r['blocks_differing']} of {r['layers']} blocks differ "
         "from the reference)"),
        ("identical trace (full cache, budget)", str(r["identical_trace"])),
        ("reference procedure (s)", f"{r['reference_seconds']:.1f}"),
        (f"AMPPruner, full cache (s, best of {r['repeats']})", f"{r['fast_seconds']:.1f}"),
        (f"AMPPruner, cache budget (s, best of {r['repeats']})", f"{r['budget_seconds']:.1f}"),
        ("speed-up (full cache)", f"{r['speedup']:.2f}x"),
        ("suffix-only bound", f"{r['suffix_bound']:.2f}x"),
        ("budget time / full-cache time", f"{r['budget_time_ratio']:.3f} (goal <= 1.25)"),
        ("full cache / budget (MiB)", f"{r['cache_full_bytes'] / mib:.2f} / "
                                      f"{r['cache_budget_bytes'] / mib:.2f} "
                                      f"({r['cache_full_bytes'] / r['cache_budget_bytes']:.2f}x)"),
        ("budget cache peak (MiB)", f"{r['budget_peak_bytes'] / mib:.2f}"),
        ("peak / full cache", f"{r['peak_fraction']:.3f} (goal <= (sqrt(L)+2)/L = "
                              f"{r['peak_fraction_bound']:.3f})"),
        ("blocks recomputed", str(r["recomputed_blocks"])),
        ("entropy evaluations", str(r["evaluations"])),
        ("state cache, full", r["cache"]),
        ("state cache, budget", r["budget_cache"]),
        ("MLP params kept", f"{r['mlp_params']['after'] / r['mlp_params']['before']:.1%}"),
        ("image-block forwards, reference procedure (counted)",
         f"{r['image_block_forwards']['reference']:,}"),
        ("image-block forwards, greedy search (full cache)",
         f"{r['image_block_forwards']['greedy']:,}"),
        ("image-block forwards, global allocation: curves / verification / total",
         "{curves:,} / {verification:,} / {total:,}".format(**r["image_block_forwards"]["global"])),
        ("global allocation (KL) at the same MLP params: kept, seconds",
         f"{g['mlp_params']['after'] / g['mlp_params']['before']:.1%}, {g['seconds']:.1f}"),
        ("KL to the original: greedy sizes / global sizes",
         f"{g['greedy_kl']:.4g} / {g['kl']:.4g}"),
        ("device", f"{r['device']}, {r['dtype']}"),
    ]))
    _write(json_out, r)
    if not (r["identical_sizes"] and r["identical_trace"]):
        raise typer.Exit(1)


def _early(layers, width, val_images, batch_size, confidences, seeds, seed, image_size,
           patch_size, threshold, device, dtype, json_out, pairings, references, orders
           ) -> None:
    from amp_plugin.bench.search import bench_early

    r = bench_early(layers, width, val_images, batch_size or 64, tuple(confidences), seeds,
                    seed, image_size, patch_size, threshold, device=device, dtype=dtype,
                    pairings=pairings, references=references, orders=orders)
    t = Table(title=f"early decisions: {layers} blocks, width {width}, {r['val_images']} "
                    f"images in {r['val_batches']} batches, threshold {threshold:g}; "
                    "image-block forwards (ref.: the reference procedure, counted), batches "
                    "read / full passes, trials decided early, sizes vs the exact search")
    for col in ("seed", "search", "forwards", "/ cache", "/ ref.", "batches read",
                "early", "sizes", "s"):
        t.add_column(col, justify="left" if col in ("search", "sizes") else "right")
    for row in r["seeds"]:
        t.add_row(str(row["seed"]), "reference (counted)", f"{row['reference']:,}",
                  f"{row['reference'] / row['cache']:.2f}", "1.00", "", "", "", "")
        t.add_row("", "cache (exact)", f"{row['cache']:,}", "1.00",
                  f"{row['cache'] / row['reference']:.3f}", "", "",
                  f"{row['mlp_params_kept']:.1%} kept", f"{row['cache_seconds']:.0f}")
        for c, o in row["options"].items():
            t.add_row("", f"confidence {c}", f"{o['image_block_forwards']:,}",
                      f"{o['over_cache']:.3f}",
                      f"{o['image_block_forwards'] / row['reference']:.3f}",
                      f"{o['batches_read']:,}/{o['batches_full_passes']:,}",
                      f"{o['decided_early']}/{row['trials']}",
                      "same" if o["identical_sizes"] else f"{o['blocks_differing']} differ",
                      f"{o['seconds']:.0f}")
    console = Console()
    console.print(t)
    for c, s in r["summary"].items():
        _spread(console, f"confidence {c}: forwards / today's cache", s["over_cache"],
                s["identical_seeds"], len(r["seeds"]),
                f" ({r['device']}, {r['dtype']}, {r['threads']} threads)")
    if orders:
        console.print(_orders_table(r, orders))
    _write(json_out, r)
    replayed = [o["orders"]["order_0_is_the_run"] for row in r["seeds"]
                for o in row["options"].values() if "orders" in o]
    if any(s["identical_seeds"] < len(r["seeds"]) for s in r["summary"].values()) or (
            not all(replayed)):
        raise typer.Exit(1)


def _orders_table(r: dict, orders: int) -> Table:
    """Each option replayed in `orders` batch orders per seed."""
    t = Table(title=f"replayed in {orders} batch orders per seed on a recording of the exact "
                    "search: orders whose sizes are the exact search's, forwards / today's "
                    "cache over those; order 0 replays the run above")
    for col in ("search", "identical", "mean", "min", "max", "order 0 = run"):
        t.add_column(col, justify="left" if col == "search" else "right")
    for key, s in r["summary"].items():
        o, f = s["orders"], s["orders"]["over_cache"] or {}
        same = all(row["options"][key]["orders"]["order_0_is_the_run"] for row in r["seeds"])
        t.add_row(f"confidence {key}", f"{o['identical']}/{o['replays']}",
                  *(f"{f[k]:.3f}" if f else "-" for k in ("mean", "min", "max")),
                  "yes" if same else "NO")
    return t


def _spread(console: Console, what: str, value: dict, identical: int, seeds: int,
            tail: str = "") -> None:
    """One summary line: a mean over seeds with its range, and on how many seeds the
    sizes stayed those of the exact search."""
    console.print(f"{what} {value['mean']:.3f} (min {value['min']:.3f}, max "
                  f"{value['max']:.3f}); sizes identical on {identical} of {seeds} seeds{tail}")


@bench.command("scoring", cls=Command)
def scoring_cmd(
    layers: int = typer.Option(12, help="transformer blocks"),
    width: int = typer.Option(64, help="embedding width (MLP hidden = 4x)"),
    calib_images: int = typer.Option(4096, help="calibration images (one whole pass)"),
    val_images: int = typer.Option(512, help="validation images of the searches"),
    batch_size: int = typer.Option(32, help="batch size of both"),
    every: int = typer.Option(4, min=1, help="calibration batches between checks"),
    patience: int = typer.Option(3, min=1, help="checks in a row without a change"),
    tolerance: list[float] = typer.Option(None, help=(
        "fraction of all neurons that may move at an unchanged check (repeatable; "
        "default 0 and 0.01)")),
    threshold: float = typer.Option(2e-3, help="entropy threshold of the searches"),
    seeds: int = typer.Option(1, min=1, help="models seed, seed+1, ..."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(None, min=1, help="torch CPU threads (default: torch's)"),
    json_out: Path = typer.Option(None, "--json", help="also write the numbers here"),
) -> None:
    """Scoring that stops when the search's candidates settle (amp.score_convergence):
    batches read, and whether the exact search keeps a whole pass's sizes."""
    import torch

    from amp_plugin.bench.scoring import bench_scoring

    tolerances = tuple(tolerance or (0.0, 0.01))
    bad = [t for t in tolerances if not 0 <= t < 1]
    if bad:
        raise typer.BadParameter(f"{bad[0]} is not in [0, 1)", param_hint="--tolerance")
    if threads is not None:
        torch.set_num_threads(threads)
    r = bench_scoring(layers, width, calib_images, val_images, batch_size, every, patience,
                      tolerances, threshold, seeds=seeds, seed=seed)
    t = Table(title=f"scoring convergence: {layers} blocks, width {width}, {calib_images} "
                    f"calibration images in batches of {batch_size}, a check every {every} "
                    f"batches, patience {patience}; sizes: the exact search on "
                    f"{val_images} images vs the whole pass's scores")
    for col in ("seed", "tolerance", "batches read", "fraction", "neurons moved", "sizes"):
        t.add_column(col, justify="right")
    for row in r["seeds"]:
        for tol, o in row["options"].items():
            t.add_row(str(row["seed"]), tol, f"{o['batches_read']}/{row['batches']}",
                      f"{o['read_fraction']:.3f}", f"{o['neurons_moved']}/{row['neurons']}",
                      "same" if o["identical_sizes"] else f"{o['blocks_differing']} differ")
    console = Console()
    console.print(t)
    for tol, s in r["summary"].items():
        _spread(console, f"tolerance {tol}: fraction of the pass read", s["read_fraction"],
                s["identical_seeds"], len(r["seeds"]))
    _write(json_out, r)


@bench.command("throughput", cls=Command)
@user_errors
def throughput_cmd(
    run: Path = typer.Option(None, help="run directory: time its original vs pruned model"),
    model: str = typer.Option("vit_base_patch16_224", help="timm model (without --run)"),
    threshold: float = typer.Option(1e-3, help="AMP threshold (without --run)"),
    round_to: int = typer.Option(64, help="candidate sizes are multiples (0: off)"),
    search_images: int = typer.Option(32, help="calibration = validation images"),
    batch_size: int = typer.Option(32),
    image_size: int = typer.Option(224),
    dtype: str = typer.Option("float32"),
    runs: int = typer.Option(10, min=1, help="timed runs per model and runtime, in turns"),
    warmup: int = typer.Option(2, min=0, help="untimed batches per model and runtime first"),
    min_seconds: float = typer.Option(0.05, min=0, help="a timed run repeats the batch until "
                                      "it lasts this long"),
    threads: int = typer.Option(None, min=1, help="CPU threads of torch and onnxruntime "
                                "(default: torch's)"),
    compile: bool = typer.Option(True, help="also time through torch.compile"),
    onnx: bool = typer.Option(True, help="also time the ONNX export in onnxruntime (CPU)"),
    json_out: Path = typer.Option(None, "--json", help="also write the numbers here"),
) -> None:
    """Throughput before vs after pruning in eager PyTorch, torch.compile and ONNX
    Runtime, all timed in turns; realised gain [interval] next to the FLOPs ratio."""
    import torch

    from amp_plugin.bench.throughput import bench_throughput

    if threads is not None:
        torch.set_num_threads(threads)
    runtimes = ("eager",) + (("compiled",) if compile else ()) + (("onnxruntime",) if onnx
                                                                   else ())
    r = bench_throughput(run=run, model_name=model, threshold=threshold,
                         round_to=round_to or None, search_images=search_images,
                         batch_size=batch_size, image_size=image_size, dtype=dtype, runs=runs,
                         runtimes=runtimes, warmup=warmup, min_seconds=min_seconds)
    console = Console()
    console.print(_table(f"throughput: {r['model']} on {r['device']}", [
        ("MLP params removed", f"{r['mlp_reduction']:.1%}"),
        ("hidden sizes", json.dumps(sorted(set(r["hidden_sizes"].values())))),
        ("FLOPs before / after (G)", f"{r['flops']['before'] / 1e9:.2f} / "
                                     f"{r['flops']['after'] / 1e9:.2f}"),
        ("FLOPs ratio", f"{r['flops_ratio']:.3f}x"),
        ("val. entropy before / after (round_to)",
         f"{r['entropy']['before']:.5f} / {r['entropy']['after']:.5f} ({r['round_to']})"
         if r.get("entropy") else "-"),
        ("timing", f"{r['dtype']}, batch {r['batch_size']}, {r['threads']} threads, "
                   f"{r['runs']} runs per row in turns after {r['warmup']} warm-up"),
    ]))
    console.print(_runtime_table(r))
    for runtime, why in r["skipped"].items():
        console.print(f"{runtime}: skipped ({why})")
    _write(json_out, r)


def _runtime_table(r: dict) -> Table:
    from rich.markup import escape

    def rate(x):
        return escape(f"{x['images_per_s']:.1f} [{x['q1']:.1f}-{x['q3']:.1f}]")

    t = Table(title=escape("img/s: median [interquartile range]; gain: ratio of medians "
                           "[>= 95% interval]"))
    for col in ("runtime", "before", "after", "realised gain", "gain / FLOPs ratio"):
        t.add_column(col, justify="left" if col == "runtime" else "right")
    for runtime, row in r["runtimes"].items():
        g = row["gain"]
        gain = f"{g['ratio']:.3f}x [{g['low']:.3f}-{g['high']:.3f}]"
        if not g["differs"]:
            gain += " (none beyond the spread)"
        t.add_row(runtime, rate(row["before"]), rate(row["after"]), escape(gain),
                  escape(f"{row['efficiency']:.3f} [{row['efficiency_low']:.3f}-"
                         f"{row['efficiency_high']:.3f}]"))
    return t


@bench.command("passes", cls=Command)
@user_errors
def passes_cmd(
    recipe: str = typer.Argument(..., help="recipe whose model (full size, random weights) "
                                           "is measured"),
    batch_size: int = typer.Option(64, help="images per pass"),
    batches: int = typer.Option(4, help="timed batches per pass (after one warm-up)"),
    dtype: str = typer.Option("bf16", help="float32, bf16 or fp16"),
    device: str = typer.Option("auto", help="cuda, cpu or auto"),
    grad_checkpointing: bool = typer.Option(True, help="activation checkpointing for scoring"),
    json_out: Path = typer.Option(None, "--json", help="also write the numbers here"),
) -> None:
    """Scoring and validation passes of a recipe's model: images/s, peak memory, and the
    hours they imply for one pass over ImageNet-1k train and E_val over ImageNet-1k val."""
    from amp_plugin.bench.passes import bench_passes

    from .common import load

    r = load(recipe, None, check_paths=False)
    spec = {**r.model.model_dump(), "weights": None}
    p = bench_passes(spec, r.data.image_size, batch_size, batches, dtype, device,
                     grad_checkpointing, r.amp.inv_temperature, max_steps=r.amp.max_steps)
    gib = 2 ** 30

    def mem(v):
        return "-" if v is None else f"{v / gib:.1f} GiB"

    im = p["imagenet"]
    Console().print(_table(f"passes: {p['model']} on {p['device']} ({dtype})", [
        ("vision params / blocks", f"{p['params']:,} / {p['blocks']}"),
        ("scoring (fwd+bwd) img/s", f"{p['score_images_per_s']:.1f}"),
        ("scoring peak memory", mem(p["score_peak_bytes"])),
        ("validation (fwd) img/s", f"{p['val_images_per_s']:.1f}"),
        ("validation peak memory", mem(p["val_peak_bytes"])),
        ("state per image per block", f"{p['state_bytes_per_image_per_block'] / 2**20:.2f} MiB"),
        ("score 1.28M images", f"{im['score_hours']:.2f} h"),
        ("one E_val over 49,920 images", f"{im['val_pass_seconds']:.0f} s"),
        ("search, reference procedure", f"{im['search_hours_reference']:.1f} h"),
        ("search, state cache", f"{im['search_hours_cached']:.1f} h"),
    ]))
    _write(json_out, p)


@bench.command("models", cls=Command)
def models_cmd(
    fast: bool = typer.Option(False, help="only the fast subset that `make test` sweeps"),
    match: str = typer.Option(None, help="only models whose name contains this"),
    markdown: Path = typer.Option(None, help="write the summary table (Markdown) here"),
    json_out: Path = typer.Option(None, "--json", help="also write every row here"),
) -> None:
    """Every ViT-like timm model and every open_clip model, built small with random
    weights: pruned end to end (score, search, prune, save/load) or refused clearly."""
    from amp_plugin.bench.models import FAST, all_models, summary, sweep, sweep_markdown

    names = list(FAST) if fast else all_models()
    if match:
        names = [(lib, n) for lib, n in names if match in n]
    start = time.perf_counter()
    rows = sweep(names)
    seconds = time.perf_counter() - start
    groups = summary(rows)
    t = Table(title=f"model sweep: {len(rows)} models")
    for col in ("library", "family", "MLP kind", "status", "models", "example"):
        t.add_column(col)
    for g in groups:
        t.add_row(g["library"], g["family"], g["mlp_kinds"], g["status"], str(g["models"]),
                  g["example"])
    Console().print(t)
    for r in rows:
        if r["status"] == "error":
            Console().print(f"[red]{r['library']} {r['name']}: {r['detail']}")
    if markdown is not None:
        from amp_plugin.utils.io import atomic_write

        atomic_write(Path(markdown), sweep_markdown(rows, groups, seconds))
    _write(json_out, {"rows": rows, "summary": groups})
    if any(r["status"] == "error" for r in rows):
        raise typer.Exit(1)
