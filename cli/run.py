"""amp run / score / prune / validate: thin wrappers over amp_plugin.pipeline."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

RecipeArg = typer.Argument(None, help="recipe file, or the name of one in recipes/ "
                                      "(default: demo_digits)")
OutOpt = typer.Option(None, "--out", "-o", help="run directory (default: recipe output_dir)")
SetOpt = typer.Option(None, "--set", "-s", help="override a recipe value: key.path=value "
                                                 "(YAML value), repeatable")


def parse_overrides(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects key.path=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load(recipe: str | None, overrides: list[str] | None):
    from amp_plugin.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, parse_overrides(overrides))
    except RecipeError as e:
        typer.secho(str(e), err=True, fg="red")
        raise typer.Exit(2) from None


def _run(recipe, out, overrides, stages, progress):
    from amp_plugin.pipeline import run

    r = load(recipe, overrides)
    return run(r, out, stages=stages, show_progress=progress)


def register(app: typer.Typer) -> None:
    @app.command()
    def validate(recipe: str = RecipeArg, set_: list[str] = SetOpt) -> None:
        """Check a recipe (schema and paths) without running anything."""
        r = load(recipe, set_)
        typer.echo(f"{r.name}: valid ({Path(r._source)})")

    @app.command("run")
    def run_cmd(recipe: str = RecipeArg, out: Path = OutOpt, set_: list[str] = SetOpt,
                stage: list[str] = typer.Option(None, "--stage", help="run only these stages"),
                progress: bool = typer.Option(True, help="show progress bars")) -> None:
        """Run a recipe's stages (train, score, prune, distill, eval, report)."""
        _run(recipe, out, set_, stage or None, progress)

    @app.command()
    def score(recipe: str = RecipeArg, out: Path = OutOpt, set_: list[str] = SetOpt,
              progress: bool = typer.Option(True, help="show progress bars")) -> None:
        """Compute AMP neuron scores (torchrun-aware)."""
        _run(recipe, out, set_, ["score"], progress)

    @app.command()
    def prune(recipe: str = RecipeArg, out: Path = OutOpt, set_: list[str] = SetOpt,
              progress: bool = typer.Option(True, help="show progress bars")) -> None:
        """Score (if needed) and adaptively prune (torchrun-aware)."""
        _run(recipe, out, set_, ["score", "prune"], progress)
