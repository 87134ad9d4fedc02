"""amp plan: parameters, FLOPs, MLP inventory and search cost of a recipe's model."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import load, user_errors


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _flops(n: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12)):
        if n >= scale:
            return f"{n / scale:,.3g} {unit}"
    return f"{n:.3g} FLOP"


def show(p: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{p['recipe']}: {p['model']['library']} {p['model']['name']}")
    t.add_column("vision tower")
    t.add_column("value", justify="right")
    t.add_row("blocks x width", f"{p['blocks']} x {p['width']}")
    t.add_row("tokens", f"{p['tokens']} at {p['image_size']}px")
    t.add_row("parameters", f"{_fmt(p['params'])} ({p['params']:,})")
    t.add_row("MLP parameters", f"{_fmt(p['mlp_params'])} ({100 * p['mlp_share']:.1f}%)")
    t.add_row("FLOPs / image", f"{p['flops'] / 1e12:.3f}T")
    console.print(t)

    inv = Table(title="MLP inventory")
    for col in ("count", "hidden", "kind", "params", "share of tower"):
        inv.add_column(col, justify="left" if col == "kind" else "right")
    for row in p["inventory"]:
        inv.add_row(str(row["count"]), str(row["hidden"]), row["kind"], _fmt(row["params"]),
                    f"{100 * row['share_of_params']:.1f}%")
    console.print(inv)

    s = p["search"]
    c, v = s["calibration"], s["validation"]
    cost = Table(title="search cost")
    cost.add_column("stage")
    cost.add_column("forward passes", justify="right")
    cost.add_row("score (forward + backward)",
                 f"{c['forward_backward_passes']} batches = {c['images']:,} images")
    cost.add_row("prune, reference procedure",
                 f"{v['full_forward_passes_reference']} x {v['batches']} batches = "
                 f"{v['image_forwards_reference']:,} images")
    cost.add_row("prune, with state cache",
                 f"{v['full_forward_equivalents_cached']} full-pass equivalents = "
                 f"{v['image_forwards_cached']:,} images")
    if "budget" in s:
        b = s["budget"]
        cost.add_row(f"prune, budget mode (<= {b['max_searches']} searches)",
                     f"<= {b['full_forward_equivalents_at_most']} full-pass equivalents = "
                     f"{b['image_forwards_at_most']:,} images "
                     f"({b['full_forward_equivalents_per_search']} per search)")
    cost.add_row("state cache", f"{v['state_cache_bytes'] / 2**30:.2f} GiB ({p['dtype']})")
    console.print(cost)

    al = s["allocation"]
    g, gl = al["greedy"], al["global"]
    f = gl["image_block_forwards"]
    alloc = Table(title=f"greedy search vs global allocation, in image-block forwards "
                        f"({al['blocks']} blocks x {al['val_images']:,} validation images = "
                        "1 full pass; amp.search.allocation: " + al["chosen"] + ")")
    alloc.add_column("")
    alloc.add_column("image-block forwards", justify="right")
    alloc.add_column("full passes", justify="right")

    def passes(n: int) -> str:
        return f"{n / (al['blocks'] * al['val_images']):,.1f}"
    alloc.add_row(f"greedy binary search ({gl['cache']} state cache, all images at every "
                  "trial)",
                  f"{g['image_block_forwards']:,}", passes(g["image_block_forwards"]))
    alloc.add_row(f"global: curves (about {gl['points']:,} points, {gl['points_per_curve']} per "
                  f"block, on {gl['curve_images']:,} images; grid {gl['grid']}, "
                  f"{gl['coarse_points']} coarse)", f"{f['curves']:,}", passes(f["curves"]))
    alloc.add_row(f"global: curves at most (<= {gl['points_per_curve_at_most']} points per "
                  "block: 2 per refinement round and solve)",
                  f"{f['curves_at_most']:,}", passes(f["curves_at_most"]))
    alloc.add_row(f"global: verification ({gl['verifications']} x all blocks, all images)",
                  f"{f['verification']:,}", passes(f["verification"]))
    alloc.add_row("global: cache" + (" (with recomputation)" if gl["cache"] == "checkpointed"
                                     else "") + ", references and bases",
                  f"{f['cache'] + f['references_and_bases']:,}",
                  passes(f["cache"] + f["references_and_bases"]))
    alloc.add_row("global: total", f"{f['total']:,}", passes(f["total"]))
    alloc.add_row("curves / greedy search (at most)", f"{al['curves_over_greedy']:.2f} "
                  f"({al['curves_at_most_over_greedy']:.2f})", "")
    console.print(alloc)

    _counted(console, s["counted"], p["blocks"])

    a = s["at_data_size"]
    f, b = a["flops"], a["cache_bytes_per_rank"]
    scale = Table(title=f"at {a['calib_images']:,} calibration and {a['val_images']:,} "
                        f"validation images, {a['ranks']} rank(s)")
    scale.add_column("")
    scale.add_column("value", justify="right")
    c = a["chosen"]
    scale.add_row("score FLOPs (forward + input-gradient backward)", _flops(f["score"]))
    scale.add_row("search FLOPs, reference procedure", _flops(f["search_reference"]))
    scale.add_row("search FLOPs, full state cache (at most)", _flops(f["search_cached"]))
    scale.add_row("search FLOPs, checkpointed every sqrt(L) (at most)",
                  _flops(f["search_checkpointed"]))
    scale.add_row("state cache per rank, full", f"{b['full'] / 2**30:,.2f} GiB")
    scale.add_row("state cache per rank, checkpointed every sqrt(L)",
                  f"{b['checkpointed'] / 2**30:,.2f} GiB")
    scale.add_row("cache budget per rank (amp.cache)", f"{b['budget'] / 2**30:,.2f} GiB")
    scale.add_row("chosen: mode / bytes / search FLOPs", f"{c['mode']} / "
                  f"{c['bytes'] / 2**30:,.2f} GiB / {_flops(c['search_flops'])}")
    console.print(scale)
    console.print(f"FLOP counter: {p['flop_counter']}; planned in {p['seconds']:.1f}s "
                  "on the meta device")


def _counted(console, e: dict, blocks: int) -> None:
    from rich.table import Table

    f, hours = e["image_block_forwards"], e.get("hours")
    full = blocks * e["images"]
    t = Table(title=f"search options in image-block forwards ({blocks} blocks x "
                    f"{e['images']:,} validation images = 1 full pass)")
    for col in ("search", "image-block forwards", "full passes", "/ cache"):
        t.add_column(col, justify="left" if col == "search" else "right")
    if hours:
        rate = e["images_per_s"]
        t.add_column(f"hours: score + search ({rate['score']:g}, {rate['validation']:g} img/s)",
                     justify="right")
    rows = [("reference", "reference procedure"), ("cache", "state cache (exact)"),
            ("early_at_most", "early decisions, at most")]
    if "early_at_read_fraction" in f:
        rows.append(("early_at_read_fraction", f"early decisions, {e['read_fraction']:g} read"))
    rows.append(("early_best_case", "early decisions, best case"))
    for key, label in rows:
        cells = [label, f"{f[key]:,}", f"{f[key] / full:,.1f}", f"{f[key] / f['cache']:.3f}"]
        if hours:
            h = hours[key]
            cells.append(f"{h['score']:.2f} + {h['search']:.2f} = {h['total']:.2f}")
        t.add_row(*cells)
    t.caption = (f"early decisions (amp.search.confidence: {e['confidence']}): a trial stops "
                 f"reading its {e['batches']:,} batches once decided; best case: one accepted "
                 f"size per block read to the end, the other trials {e['min_batches']} batches")
    console.print(t)


def _rates(text: str | None) -> tuple[float, float] | None:
    import typer

    if text is None:
        return None
    try:
        score, val = (float(x) for x in text.split(","))
    except ValueError:
        score = val = -1.0
    if not (score > 0 and val > 0):
        raise typer.BadParameter(f"expected SCORE,VALIDATION images per second (two positive "
                                 f"numbers, e.g. 215,910), got {text!r}",
                                 param_hint="--images-per-s")
    return score, val


@user_errors
def plan_cmd(recipe: str = typer.Argument(..., help="recipe file or shipped name"),
             json_out: Path = typer.Option(None, "--json", help="also write the plan here"),
             calib_images: int = typer.Option(None, help="plan at this many calibration images "
                                              "(default: the recipe's)"),
             val_images: int = typer.Option(None, help="plan at this many validation images"),
             ranks: int = typer.Option(1, min=1, help="processes sharing the validation states"),
             curve_images: int = typer.Option(None, min=1, help=(
                 "plan the global allocation's curves on this many validation images "
                 "(default: the recipe's amp.search.curve_images, else all)")),
             images_per_s: str = typer.Option(None, help=(
                 "SCORE,VALIDATION throughput in images/s (e.g. 215,910): the implied hours "
                 "of each search option")),
             read_fraction: float = typer.Option(None, min=0, max=1, help=(
                 "early decisions: the fraction of their batches trials read, as measured "
                 "by amp bench search --confidence"))
             ) -> None:
    """Parameters, FLOPs, MLP inventory, search cost and its FLOPs and cache bytes at a data
    size (meta device: no weights)."""
    from amp_plugin import plan
    from amp_plugin.utils.io import write_json

    sizes = {f"data.{k}": v for k, v in (("calib_images", calib_images),
                                         ("val_images", val_images)) if v is not None}
    r = load(recipe, [f"{k}={v}" for k, v in sizes.items()], check_paths=False)
    p = plan(r, ranks=ranks, curve_images=curve_images, read_fraction=read_fraction,
             images_per_s=_rates(images_per_s))
    show(p)
    missing = {k: v for k, v in r.required_paths().items() if not Path(v).exists()}
    for key, path in missing.items():
        typer.secho(f"note: {key}: {path} does not exist (needed by score/prune)",
                    err=True, fg="yellow")
    for note in p["search"]["assumed"]:
        typer.secho(f"note: {note}", err=True, fg="yellow")
    if json_out is not None:
        write_json(json_out, p)
        typer.echo(f"plan written to {json_out}")
