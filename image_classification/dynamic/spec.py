"""The vocabulary of operator specs, below the operator contract: :class:`Option` (one option's type, default,
choices and help), :class:`ConvSpec` (a parsed ``name:key=value,...``) and :func:`check_options`.

Each registered operator class carries its own options (``spec_options``, set by
:func:`~.registry.register_operator`), so checking a constructor's arguments or printing a spec reads the class or
the spec, never the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["ConvSpec", "LiveChoices", "Option", "check_options"]


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


class LiveChoices(Sequence[str]):
    """Choices read anew at every use from ``names()``, for a set that grows after import (PEDConv's execution
    paths: a path registered later is a valid ``path=NAME`` from then on)."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names

    def __getitem__(self, index: Any) -> Any:
        return tuple(self._names())[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __repr__(self) -> str:
        return f"LiveChoices({tuple(self._names())!r})"


@dataclass(frozen=True)
class Option:
    """One option of an operator: its type, default, allowed choices and a one-line help."""

    type: Any  # int, float, bool, str, or "set" (a '+'-joined subset of ``choices``)
    default: Any
    help: str = ""
    choices: Optional[Sequence[str]] = None  # a tuple, or LiveChoices for a registry that grows
    minimum: Optional[float] = None

    def parse(self, op: str, key: str, text: str) -> Any:
        try:
            if self.type == "set":
                value: Any = tuple(part for part in text.split("+") if part)
                bad = [v for v in value if self.choices and v not in self.choices]
                if bad or not value:
                    raise ValueError(f"choose a '+'-joined subset of {'/'.join(self.choices or ())}")
                return value
            if self.type is bool:
                return _parse_bool(text)
            value = self.type(text)
        except ValueError as exc:
            raise ValueError(f"bad value {text!r} for option {key!r} of operator {op!r}: {exc}") from None
        self.check(op, key, value)
        return value

    def check(self, op: str, key: str, value: Any) -> None:
        """Raise a one-line ValueError naming ``op`` and ``key`` when ``value`` is not of this option's type,
        outside its choices or below its minimum."""
        def bad(what: str) -> ValueError:
            return ValueError(f"option {key!r} of operator {op!r} must be {what}, got {value!r}")

        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad("an integer" + (f" >= {self.minimum:g}" if self.minimum is not None else ""))
        if self.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad("a number")
        if self.type is bool and not isinstance(value, bool):
            raise bad("true or false")
        if self.type == "set":
            items = tuple(part for part in value.split("+") if part) if isinstance(value, str) else tuple(value)
            if not items or any(item not in (self.choices or ()) for item in items):
                raise bad(f"a non-empty subset of {'/'.join(self.choices or ())}")
            return
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"bad value {value!r} for option {key!r} of operator {op!r}; valid: {', '.join(map(str, self.choices))}"
            )
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"option {key!r} of operator {op!r} must be >= {self.minimum:g}, got {value!r}")


@dataclass(frozen=True)
class ConvSpec:
    """A parsed operator spec: the operator name and its complete option values (defaults filled).

    ``defaults`` holds the operator's option defaults (:func:`~.registry.parse_spec` fills it), so that ``str``
    writes only the options that differ without reading the registry; it takes no part in equality."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_static(self) -> bool:
        return self.name == "static"

    def __str__(self) -> str:
        changed = []
        for key, value in self.options.items():
            if key not in self.defaults or value != self.defaults[key]:
                if isinstance(value, tuple):
                    text = "+".join(value)
                else:
                    text = str(value).lower() if isinstance(value, bool) else str(value)
                changed.append(f"{key}={text}")
        return self.name + (":" + ",".join(changed) if changed else "")


def check_options(cls: type, values: Mapping[str, Any]) -> None:
    """Check constructor arguments against the Options that operator class ``cls`` carries (``spec_options``, set
    by :func:`~.registry.register_operator` and inherited by unregistered subclasses); arguments without an
    Option, and classes without options, pass."""
    name = getattr(cls, "registered_name", "") or cls.__name__
    for key, value in values.items():
        option = getattr(cls, "spec_options", {}).get(key)
        if option is not None:
            option.check(name, key, value)
