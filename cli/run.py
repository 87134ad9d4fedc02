"""amp validate / run / score / prune / distill: thin wrappers over amp_plugin.run."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import OutOpt, ProgressOpt, RecipeArg, SetOpt, fail, load, user_errors


@user_errors
def validate(recipe: str = RecipeArg, set_: list[str] = SetOpt) -> None:
    """Check a recipe (schema, registries and paths) without running anything."""
    r = load(recipe, set_)
    typer.echo(f"{r.name}: valid ({Path(r._source)})")


def _stages(names: list[str] | None) -> list[str] | None:
    from amp_plugin.config import STAGES

    for name in names or []:
        if name not in STAGES:
            raise typer.BadParameter(f"unknown stage {name!r}; choose from "
                                     f"{', '.join(STAGES)}", param_hint="--stage")
    return names or None


def _run(recipe, out, overrides, stages, progress) -> dict:
    from amp_plugin import run

    return run(load(recipe, overrides), out, stages=stages, show_progress=progress)


@user_errors
def run_cmd(recipe: str = RecipeArg, out: Path = OutOpt, set_: list[str] = SetOpt,
            stage: list[str] = typer.Option(None, "--stage", metavar="STAGE", help=(
                "run only this stage (repeatable), one of: train, score, prune, distill, "
                "eval, report")),
            progress: bool = ProgressOpt) -> None:
    """Run a recipe's stages (train, score, prune, distill, eval, report)."""
    _run(recipe, out, set_, _stages(stage), progress)


@user_errors
def score(recipe: str = RecipeArg, out: Path = OutOpt, set_: list[str] = SetOpt,
          progress: bool = ProgressOpt) -> None:
    """Compute AMP neuron scores (torchrun-aware)."""
    _run(recipe, out, set_, ["score"], progress)


@user_errors
def prune(recipe: str = RecipeArg, out: Path = OutOpt, set_: list[str] = SetOpt,
          progress: bool = ProgressOpt) -> None:
    """Score (kept when done) and adaptively prune (torchrun-aware)."""
    _run(recipe, out, set_, ["score", "prune"], progress)


def _distill_table(result: dict):
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


@user_errors
def distill(recipe: str = RecipeArg, out: Path = OutOpt, set_: list[str] = SetOpt,
            progress: bool = ProgressOpt) -> None:
    """Distil the pruned model of a run from the original (DeepSpeed ZeRO; resumable).

        amp distill RECIPE                                   one process (no launcher)
        deepspeed --num_gpus 2 $(which amp) distill RECIPE   two ranks (GPUs, or gloo on CPU)
    """
    import torch.distributed as dist
    from rich.console import Console

    from amp_plugin import Run
    from amp_plugin.distill.engine import init_distributed

    r = load(recipe, set_)
    init_distributed()  # DeepSpeed's process group (the launcher's ranks, or one)
    result = Run(r, out, show_progress=progress).execute(["distill"])["distill"]
    if dist.get_rank() == 0:
        Console().print(_distill_table(result))
        typer.echo(f"result: {result['paths']['result']}")


__all__ = ["distill", "fail", "prune", "run_cmd", "score", "validate"]
