"""mkdocs hook: the CLI reference, generated from the Typer app each time the manual is built.

A line `<!-- cli-reference -->` in a page becomes the Markdown of every `amp` command, argument
and option (Typer's own generator, the one behind `typer ... utils docs`), so the reference
cannot drift from the code; an import error fails the build."""

from __future__ import annotations

MARKER = "<!-- cli-reference -->"


def cli_markdown() -> str:
    import typer
    from amp_cli.app import app
    from typer.cli import get_docs_for_click

    command = typer.main.get_command(app)
    return get_docs_for_click(obj=command, ctx=typer.Context(command), indent=1, name="amp")


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_markdown())
