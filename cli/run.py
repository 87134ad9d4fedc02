"""amp run / score / prune / validate."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def validate(recipe: str = typer.Argument(None, help="recipe file or shipped name")) -> None:
        """Validate a recipe (schema and paths) without running anything."""
        from amp_plugin.recipe import RecipeError, load_recipe

        try:
            r = load_recipe(recipe)
        except RecipeError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2) from None
        typer.echo(f"{r.name}: valid")
