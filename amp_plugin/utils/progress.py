"""Rich progress bars for every loop over data: count, images/s, elapsed, ETA and a
status line (e.g. the cache mode, or the block, step and candidate size of a search)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .dist import is_main

T = TypeVar("T")


class _RateColumn(ProgressColumn):
    """Units per second since the bar started (rich's own speed column is for bytes)."""

    def render(self, task) -> Text:
        unit, done = task.fields.get("unit"), task.fields.get("units", 0)
        if not unit or not task.elapsed:
            return Text("")
        return Text(f"{done / task.elapsed:.1f} {unit}/s")


def count_images(batch) -> int:
    """Images in a batch: a tensor or a tuple whose first element is the images."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    return 0


class Bar:
    """One bar (rank 0 only; silent when disabled): `advance(units=...)` counts steps and
    the images behind them, `note(text)` sets the status shown after the ETA."""

    def __init__(self, description: str, total: int | None, enabled: bool = True,
                 unit: str | None = None, status: str = ""):
        self.enabled = enabled and is_main()
        self.description, self.total, self.unit, self.status = description, total, unit, status
        self._progress: Progress | None = None
        self._task = None
        self._units = 0

    def __enter__(self) -> Bar:
        if self.enabled:
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[status]}"))
            self._progress = Progress(*columns, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total,
                                                 unit=self.unit, units=0, status=self.status)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def advance(self, steps: int = 1, units: int = 0) -> None:
        self._units += units
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, units=self._units)

    def note(self, status: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, status=status)


def progress(items: Iterable[T], description: str, enabled: bool = True,
             total: int | None = None, unit: str | None = None, status: str = ""
             ) -> Iterator[T]:
    """Iterate `items` under a progress bar; with `unit`, also the images per second."""
    if not enabled or not is_main():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Bar(description, total, enabled, unit, status) as bar:
        for item in items:
            yield item
            bar.advance(1, count_images(item) if unit else 0)
