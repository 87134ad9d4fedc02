"""What every command shares: recipe arguments, `--set` overrides, and the one handler
that turns a user error (bad recipe, missing file, impossible setting) into a message and
exit status 2."""

from __future__ import annotations

import functools
from pathlib import Path

import typer
import yaml
from typer.core import TyperCommand, TyperGroup

RecipeArg = typer.Argument(None, metavar="RECIPE", help="recipe file, or the name of one in "
                                                       "recipes/ (default: demo_digits)")
OutOpt = typer.Option(None, "--out", "-o", metavar="DIR",
                      help="run directory (default: recipe output_dir)")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY.PATH=VALUE",
                      help="override a recipe value (YAML value), repeatable")
ProgressOpt = typer.Option(True, help="show progress bars")


def _untyped_flags(params: list) -> list:
    # A flag takes no value: its help row shows no type (the help renderer would print
    # `<bool>` beside --help and --progress).
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(TyperCommand):
    """Every `amp` command: help rows of flags without a value type."""

    def get_params(self, ctx) -> list:
        return _untyped_flags(super().get_params(ctx))


class Group(TyperGroup):
    """`amp` and `amp bench`: help rows of flags without a value type."""

    def get_params(self, ctx) -> list:
        return _untyped_flags(super().get_params(ctx))


def fail(message: str) -> None:
    typer.secho(message, err=True, fg="red")
    raise typer.Exit(2)


def user_errors(fn):
    """Report the library's user errors (RecipeError, DistillError, MaskError, other
    ValueErrors, missing files, a full disk) as one red message and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        except OSError as e:
            from amp_plugin.utils.io import NoSpaceError  # (imported only when needed)

            if not isinstance(e, NoSpaceError):
                raise
            fail(str(e))
    return wrapper


def parse_overrides(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects key.path=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except RecursionError:
            raise typer.BadParameter(f"--set {key}: the value is nested too deeply") from None
        except yaml.YAMLError as e:
            raise typer.BadParameter(f"--set {item!r}: the value is not plain YAML data "
                                     f"({str(e).splitlines()[0]})") from None
    return out


def load(recipe: str | None, overrides: list[str] | None, check_paths: bool = True):
    from amp_plugin import load_recipe

    return load_recipe(recipe, parse_overrides(overrides), check_paths=check_paths)


def load_target(target: str | None, overrides: list[str] | None):
    """(recipe, run directory) from a recipe (its output_dir) or a run directory."""
    from amp_plugin import RunDir

    path = Path(target) if target else None
    if path is not None and path.is_dir():
        rd = RunDir(path)
        if not rd.is_run():
            fail(f"{path} is not a run directory: it has no {rd.recipe.name}")
        return load(str(rd.recipe), overrides), path
    recipe = load(target, overrides)
    return recipe, Path(recipe.output_dir)
