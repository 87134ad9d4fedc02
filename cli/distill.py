"""amp distill: DeepSpeed distillation of a run's pruned model from the original.

    amp distill RECIPE                                   one process (no launcher)
    deepspeed --num_gpus 2 $(which amp) distill RECIPE   two ranks (GPUs, or gloo on CPU)

The same command resumes from the newest checkpoint of the run directory.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .run import OutOpt, RecipeArg, SetOpt, load


def _table(result: dict):
    from rich.table import Table

    table = Table(title="distillation")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("steps", f"{result['steps']} / {result['total_steps']}"),
        ("resumed from step", str(result["resumed_from"] or "-")),
        ("loss", result["loss"]),
        ("first -> final loss", f"{result['first_loss']:.5g} -> {result['final_loss']:.5g}"
         if result["first_loss"] is not None else "-"),
        ("ranks x ZeRO stage", f"{result['world_size']} x {result['zero_stage']}"),
        ("global batch", str(result["global_batch"])),
        ("peak lr", f"{result['lr']:.3g}"),
        ("dtype", result["dtype"]),
        ("seconds", f"{result['seconds']:.1f}"),
        ("distilled model", result["paths"]["distilled"]),
        ("loss log", result["paths"]["log"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def register(app: typer.Typer) -> None:
    @app.command()
    def distill(
        recipe: str = RecipeArg,
        out: Path = OutOpt,
        set_: list[str] = SetOpt,
        progress: bool = typer.Option(True, help="show progress bars"),
    ) -> None:
        """Distil the pruned model of a run from the original (DeepSpeed ZeRO; resumable)."""
        from rich.console import Console

        from amp_plugin.distill import DistillError, distill

        r = load(recipe, set_)
        try:
            result = distill(r, out or Path(r.output_dir), progress_bar=progress)
        except DistillError as e:
            typer.secho(str(e), err=True, fg="red")
            raise typer.Exit(2) from None
        import torch.distributed as dist

        if dist.get_rank() == 0:
            Console().print(_table(result))
            typer.echo(f"result: {result['paths']['result']}")
