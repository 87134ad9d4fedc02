"""The `amp` command: a thin Typer layer over amp_plugin. Every command is a module-level
function (importable, callable from Python) registered here once; everything a command
does is a call into amp_plugin (`amp_plugin.run`, `amp_plugin.plan`, ...)."""

from __future__ import annotations

import typer

from .bench import bench
from .common import Command, Group
from .evaluate import eval_cmd, report_cmd
from .export import export_cmd
from .plan import plan_cmd
from .run import distill, prune, run_cmd, score, validate
from .study import study_cmd

app = typer.Typer(
    name="amp",
    cls=Group,
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


app.command(cls=Command)(validate)
app.command("run", cls=Command)(run_cmd)
app.command(cls=Command)(score)
app.command(cls=Command)(prune)
app.command(cls=Command)(distill)
app.command("eval", cls=Command)(eval_cmd)
app.command("report", cls=Command)(report_cmd)
app.command("export", cls=Command)(export_cmd)
app.command("plan", cls=Command)(plan_cmd)
app.command("study", cls=Command)(study_cmd)
app.add_typer(bench, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
