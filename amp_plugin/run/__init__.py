"""Running recipes: the run directory, the pipeline of stages, plans, reports, benchmarks."""

from .layout import RunDir
from .pipeline import Run, evaluate_run, run
from .plan import plan
from .recipe import DEFAULT_RECIPE, RECIPES_DIR, RecipeError, load_recipe

__all__ = ["DEFAULT_RECIPE", "RECIPES_DIR", "RecipeError", "Run", "RunDir", "evaluate_run",
           "load_recipe", "plan", "run"]
