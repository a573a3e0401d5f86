"""One registry idiom for the project's named choices: operators (``--conv``), architectures (``--arch``), data
backends (``--data-backend``) and PEDConv's execution paths (``pedconv:path=``).

A :class:`NamedRegistry` is a mapping from name to entry with the three things every registry here needs:
``register`` (refusing a duplicate unless told to replace it), ``lookup`` (a miss is one line naming the valid
choices) and ``names``.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, MutableMapping, TypeVar

__all__ = ["NamedRegistry"]

T = TypeVar("T")


class NamedRegistry(MutableMapping[str, T]):
    """``name -> entry`` with registration, a look-up that names the valid choices, and the sorted names.

    ``kind`` names an entry in messages ("operator", "arch", ...); ``plural`` defaults to ``kind + "s"``. The
    entries live in a plain dict (not a dict subclass: torch.compile on torch 2.6 mis-guards look-ups in a dict
    subclass read inside a compiled forward, as PEDConv's path registry is).
    """

    def __init__(self, kind: str, plural: str = "") -> None:
        self.kind = kind
        self.plural = plural or kind + "s"
        self.entries: Dict[str, T] = {}

    def __getitem__(self, name: str) -> T:
        return self.entries[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self.entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __repr__(self) -> str:
        return f"NamedRegistry({self.kind!r}, {sorted(self.entries)!r})"

    def register(self, name: str, entry: T, replace: bool = False) -> T:
        """Add ``entry`` under ``name``; a name already taken is a ValueError unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self.entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.entries[name] = entry
        return entry

    def decorator(self, name: str, replace: bool = False) -> Callable[[T], T]:
        """``@registry.decorator(name)``: :meth:`register` the decorated object under ``name``."""
        return lambda entry: self.register(name, entry, replace)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry); an unknown name is :meth:`lookup`'s error."""
        self.lookup(name)
        del self.entries[name]

    def lookup(self, name: str) -> T:
        """The entry of ``name``, or a one-line ValueError naming the valid ones."""
        if name not in self.entries:
            raise ValueError(self.unknown(name))
        return self.entries[name]

    def unknown(self, name: object) -> str:
        """The one line for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names()) or '(none)'}"

    def names(self) -> List[str]:
        """The registered names, sorted."""
        return sorted(self.entries)
