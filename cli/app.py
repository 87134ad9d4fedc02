"""The `amp` command: a thin Typer layer over amp_plugin (everything here is callable
from Python through amp_plugin.pipeline and friends).

Sub-command groups live in their own modules, each exposing `register(app)`; they are
listed once in COMMAND_MODULES.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="amp",
    help="Adaptive MLP Pruning (AMP) for large vision transformers.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

@app.callback()
def _root(
    # `deepspeed $(which amp) ...` inserts --local_rank=N before the command; ranks read
    # LOCAL_RANK from the environment, so the value is accepted and not used.
    local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Adaptive MLP Pruning (AMP) for large vision transformers."""


COMMAND_MODULES = [
    "amp_cli.run", "amp_cli.bench", "amp_cli.plan", "amp_cli.evaluate", "amp_cli.distill",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
