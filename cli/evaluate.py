"""amp eval / amp report: thin wrappers over amp_plugin.evaluate and amp_plugin.report."""

from __future__ import annotations

from pathlib import Path

import typer

RUN_RECIPE = "recipe.yaml"  # the copy of the recipe `amp run` writes into its run directory


def _load(target: str | None, overrides: list[str] | None):
    """(recipe, run directory) from a recipe (its output_dir) or a run directory."""
    from amp_plugin.recipe import RecipeError, load_recipe

    from .run import parse_overrides

    path = Path(target) if target else None
    run_dir = None
    if path is not None and path.is_dir():
        run_dir = path
        if not (path / RUN_RECIPE).is_file():
            typer.secho(f"{path} is not a run directory: it has no {RUN_RECIPE}", err=True,
                        fg="red")
            raise typer.Exit(2)
        target = str(path / RUN_RECIPE)
    try:
        recipe = load_recipe(target, parse_overrides(overrides))
    except RecipeError as e:
        typer.secho(str(e), err=True, fg="red")
        raise typer.Exit(2) from None
    return recipe, run_dir or Path(recipe.output_dir)


def _tasks(values: list[str] | None) -> list[str] | None:
    from amp_plugin.evaluate import TASKS

    if not values:
        return None
    tasks = [t.strip() for v in values for t in v.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}",
                                 param_hint="--tasks")
    return tasks


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        target: str = typer.Argument(None, help="recipe file / shipped name, or a run directory"),
        tasks: list[str] = typer.Option(None, "--tasks", "-t", help="knn, linear_probe, "
                                        "zeroshot_classification, zeroshot_retrieval, "
                                        "throughput (comma-separated or repeated)"),
        set_: list[str] = typer.Option(None, "--set", "-s", help="override a recipe value: "
                                       "key.path=value (YAML value), repeatable"),
        progress: bool = typer.Option(True, help="show progress bars"),
    ) -> None:
        """Evaluate the original, pruned and distilled models of a run directory."""
        from rich.console import Console

        from amp_plugin.evaluate import EVAL_JSON, evaluate_run
        from amp_plugin.report import (
            REPORT_JSON,
            build_report,
            read_json,
            render_table,
            write_report,
        )

        chosen = _tasks(tasks)
        recipe, run_dir = _load(target, set_)
        console = Console()
        try:
            evaluate_run(recipe, run_dir, chosen, show_progress=progress, log=console.log)
        except (ValueError, FileNotFoundError) as e:
            typer.secho(str(e), err=True, fg="red")
            raise typer.Exit(2) from None
        report_path = run_dir / REPORT_JSON
        if not report_path.is_file():
            write_report(run_dir, build_report(recipe, run_dir))
        console.print(render_table(read_json(report_path)))
        console.print(f"results: {run_dir / EVAL_JSON}, {report_path}")

    @app.command("report")
    def report_cmd(run_dir: Path = typer.Argument(..., help="run directory with report.json")
                   ) -> None:
        """Re-render a run's report: rich table, report.json and plots/*.png."""
        from rich.console import Console

        from amp_plugin.report import PLOTS_DIR, REPORT_JSON, render_report

        try:
            table = render_report(run_dir)
        except (ValueError, FileNotFoundError) as e:
            typer.secho(str(e), err=True, fg="red")
            raise typer.Exit(2) from None
        console = Console()
        console.print(table)
        plots = sorted((run_dir / PLOTS_DIR).glob("*.png"))
        console.print(f"{run_dir / REPORT_JSON}; plots: " + ", ".join(str(p) for p in plots))
