"""Rich progress bars for every loop over data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .dist import is_main

T = TypeVar("T")


def progress(items: Iterable[T], description: str, enabled: bool = True,
             total: int | None = None) -> Iterator[T]:
    """Iterate `items` under a rich progress bar (rank 0 only; silent when disabled)."""
    if not enabled or not is_main():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
