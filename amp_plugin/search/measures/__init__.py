"""Search measures, one module each, behind one protocol (`base.SearchMeasure`) and a
registry: what the search minimises or bounds when it decides the MLP sizes.

    entropy_rise   the authors' rule (the default): the validation batch entropy
    kl             KL(original || candidate) of the batch-similarity distributions
    cosine         1 - mean cosine to the original model's features

A recipe names one with `amp.search.measure`; `register_measure` adds another.
"""

from __future__ import annotations

from ...utils.registry import Registry
from .base import NEEDS, SearchMeasure

_MEASURES: Registry[type[SearchMeasure]] = Registry("search measure")


def register_measure(cls: type[SearchMeasure]) -> type[SearchMeasure]:
    """Class decorator: register a `SearchMeasure` under its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise ValueError(f"measure {cls.name!r} needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    return _MEASURES.register(cls.name, cls)


def list_measures() -> list[str]:
    """Registered names, the default first."""
    return sorted(_MEASURES, key=lambda n: n != DEFAULT_MEASURE)


def measure_class(name: str) -> type[SearchMeasure]:
    return _MEASURES.get(name)


def make_measure(name: str | SearchMeasure, importance) -> SearchMeasure:
    """The measure `name` for a search scored by `importance` (an instance passes)."""
    if isinstance(name, SearchMeasure):
        return name
    return measure_class(name).from_importance(importance)


DEFAULT_MEASURE = "entropy_rise"

from . import cosine, entropy_rise, kl  # noqa: E402,F401  (register the measures)

__all__ = ["DEFAULT_MEASURE", "NEEDS", "SearchMeasure", "list_measures", "make_measure",
           "measure_class", "register_measure"]
