"""Named entries of one kind (model builders, export formats, eval tasks, ...), kept in
registration order: the one registry behind every `register_*` / `list_*` / `get_*`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`kind` names the entries in errors ("export format": "unknown export format 'x';
    expected one of onnx, ..."); `listing` is the words before the known names."""

    def __init__(self, kind: str, listing: str = "expected one of") -> None:
        self.kind = kind
        self.listing = listing
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, replace: bool = False) -> T:
        """Add `entry` under `name`; a second entry under a taken name is refused (two
        plugins silently replacing each other) unless `replace` says it is meant."""
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register_class(self, cls: type[T]) -> type[T]:
        """Class decorator: register one instance of `cls` under its `name` attribute."""
        self.register(cls.name, cls())  # type: ignore[attr-defined]
        return cls

    def decorator(self, name: str, replace: bool = False) -> Callable[[T], T]:
        """`@registry.decorator(name)`: register the decorated object under `name`."""
        def deco(entry: T) -> T:
            return self.register(name, entry, replace)
        return deco

    def unknown(self, name: str, also: Sequence[str] = ()) -> str:
        """The error for an unregistered `name`, listing the known names (`also` first:
        names accepted outside the registry)."""
        return (f"unknown {self.kind} {name!r}; {self.listing} "
                f"{', '.join([*also, *self._entries])}")

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
