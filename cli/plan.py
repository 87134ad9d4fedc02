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
    console.print(f"FLOP counter: {p['flop_counter']}; planned in {p['seconds']:.1f}s "
                  "on the meta device")


@user_errors
def plan_cmd(recipe: str = typer.Argument(..., help="recipe file or shipped name"),
             json_out: Path = typer.Option(None, "--json", help="also write the plan here")
             ) -> None:
    """Parameters, FLOPs, MLP inventory and search cost (meta device: no weights)."""
    from amp_plugin import plan
    from amp_plugin.utils.io import write_json

    r = load(recipe, None, check_paths=False)
    p = plan(r)
    show(p)
    missing = {k: v for k, v in r.required_paths().items() if not Path(v).exists()}
    for key, path in missing.items():
        typer.secho(f"note: {key}: {path} does not exist (needed by score/prune)",
                    err=True, fg="yellow")
    if json_out is not None:
        write_json(json_out, p)
        typer.echo(f"plan written to {json_out}")
