"""The eval-task protocol and its registry.

A task evaluates one model (original, pruned or distilled) at a time and returns a
JSON-able result (a `joint` task gets every model at once, e.g. to time them in turns);
the results land in eval.json under the task's `key` (per role, or per dataset then
role), and the report renders them with the task's `rows`. A new task is one
module in this package with a `@register_task` class, plus one import line in
`amp_plugin/evaluate/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DataConfig, EvalConfig
from ..data.base import DataSource
from ..utils.registry import Registry

ROLES = ("teacher", "pruned", "distilled")


@dataclass
class OriginalFeatures:
    """Where an evaluation finds the original model when a task needs its features and
    the original is not among the models evaluated: `load()` builds it; `cache` (a
    safetensors file) keeps its features between evaluations, valid while `identity`
    (what the original is made of) and the labelled splits stay the same."""

    load: Callable[[], nn.Module] | None = None
    cache: Path | None = None
    identity: str = ""


@dataclass
class EvalContext:
    """What tasks may read: the data section and its source, where to cache, the original
    model's features (`reference`: how to load the original, where its features are
    cached), the roles being evaluated, and a scratch dict shared by the tasks of one
    evaluation (e.g. features used by kNN and the probe)."""

    data: DataConfig
    source: DataSource
    seed: int
    device: torch.device
    cache_dir: Path | None = None  # e.g. cached zero-shot text classifiers
    show_progress: bool = True
    log: Callable[[str], None] = lambda msg: None
    reference: OriginalFeatures | None = None
    roles: tuple[str, ...] = ()  # set by evaluate_models
    scratch: dict = field(default_factory=dict)

    def once(self, key, make: Callable[[], Any]) -> Any:
        """`make()` the first time `key` is asked for, the same value afterwards."""
        if key not in self.scratch:
            self.scratch[key] = make()
        return self.scratch[key]


@dataclass
class Row:
    """One line of the report table: a label and a value per role."""

    label: str
    values: dict[str, float | None]
    fmt: str = "pct"  # pct: two decimals; ratio: three; rate: images/s with one decimal
    note: str = ""  # rate rows: shown in the change column
    new_section: bool = False
    footnote: str = ""  # said once under the table, the label marked
    text: dict[str, str] | None = None  # cells as shown (e.g. a value and its spread)


class EvalTask:
    name = "base"
    key = ""               # section of eval.json / report.json (default: the name)
    per_dataset = False    # results nest by dataset name, then role
    needs_text_tower = False
    needs_labels = False
    order = 50             # place in the default task list and in the report table
    joint = False          # run_joint with every model at once instead of run per model

    def section(self) -> str:
        return self.key or self.name

    def example(self, root: Path) -> dict:
        """The `eval` section (datasets written under `root` from the digits) with which
        the contract tests run this task on a small CLIP model and digits data."""
        return {}

    def default(self, cfg: EvalConfig) -> bool:
        """Whether the task runs when `eval.tasks` is not given."""
        return True

    def check(self, cfg: EvalConfig, ctx: EvalContext, model: nn.Module) -> None:
        """Raise ValueError (naming the recipe key) if the task cannot run; called for the
        original model before any evaluation starts."""

    def run(self, model: nn.Module, role: str, cfg: EvalConfig, ctx: EvalContext) -> Any:
        raise NotImplementedError

    def run_joint(self, models: dict[str, nn.Module], cfg: EvalConfig,
                  ctx: EvalContext) -> dict[str, Any]:
        """{role: result} for every model at once (tasks with `joint`); the models stay on
        the host between the other tasks and this one."""
        raise NotImplementedError

    def finish(self, section: dict, models: dict[str, dict]) -> None:
        """Derive values across roles (e.g. gains) once every model is evaluated."""

    def rows(self, section: dict) -> list[Row]:
        """Lines of the report table for this task's section."""
        return [Row(self.name, {r: section.get(r) for r in ROLES})]


_TASKS: Registry[EvalTask] = Registry("eval task", listing="known:")


def register_task(cls: type[EvalTask]) -> type[EvalTask]:
    return _TASKS.register_class(cls)


def list_tasks() -> list[str]:
    return sorted(_TASKS, key=lambda name: _TASKS.get(name).order)


def get_task(name: str) -> EvalTask:
    return _TASKS.get(name)


def resolved_tasks(cfg: EvalConfig) -> list[str]:
    """`eval.tasks`, or the registered tasks that run by default for this section."""
    if cfg.tasks is not None:
        return list(cfg.tasks)
    return [name for name in list_tasks() if _TASKS.get(name).default(cfg)]
