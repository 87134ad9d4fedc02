"""amp eval / amp report: thin wrappers over the eval and report stages."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import ProgressOpt, SetOpt, load_target, user_errors


def _tasks(values: list[str] | None) -> list[str] | None:
    from amp_plugin import list_tasks

    if not values:
        return None
    tasks = [t.strip() for v in values for t in v.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in list_tasks()]
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {unknown}; choose from "
                                 f"{', '.join(list_tasks())}", param_hint="--tasks")
    return tasks


@user_errors
def eval_cmd(
    target: str = typer.Argument(None, help="recipe file / shipped name, or a run directory"),
    tasks: list[str] = typer.Option(None, "--tasks", "-t", metavar="TASK[,TASK]",
                                    help="registered eval tasks "
                                    "(comma-separated or repeated), e.g. knn, linear_probe, "
                                    "prototype, original_knn, identification, "
                                    "cosine_to_original, zeroshot_classification, "
                                    "zeroshot_retrieval, throughput"),
    set_: list[str] = SetOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Evaluate the original, pruned and distilled models of a run directory, then
    rewrite its report."""
    from rich.console import Console

    from amp_plugin import Run

    chosen = _tasks(tasks)
    recipe, run_dir = load_target(target, set_)
    console = Console()
    run = Run(recipe, run_dir, console=console, show_progress=progress)
    try:
        run.start(["eval", "report"])
        run.stage_eval(chosen)
        run.stage_report()
    finally:
        run.close()
    console.print(f"results: {run.dir.eval_json}, {run.dir.report_json}")


@user_errors
def report_cmd(run_dir: Path = typer.Argument(..., help="run directory with report.json")
               ) -> None:
    """Re-render a run's report: rich table, report.json and plots/*.png."""
    from rich.console import Console

    from amp_plugin import RunDir
    from amp_plugin.run.report import render_report

    rd = RunDir(run_dir)
    table = render_report(rd)
    console = Console()
    console.print(table)
    plots = sorted(rd.plots.glob("*.png"))
    console.print(f"{rd.report_json}; plots: " + ", ".join(str(p) for p in plots))
