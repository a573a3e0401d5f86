"""Recipes: YAML files of long flag names that become a parser's defaults (``--config FILE.yaml``).

A recipe may name a ``base:`` recipe (a path relative to its own directory) whose keys it inherits and
overrides; bases chain, and a cycle or a missing base is an error naming the files. :func:`read_recipe_chain`
is the one reader of recipe files; :func:`load_config` checks a chain's keys and values against any parser
whose options are long flags (main.py's, the dense tasks' programs', the Fashion-MNIST study's).
"""

from __future__ import annotations

import argparse
import os
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NoReturn, Optional, cast

__all__ = ["RECIPE_BASE_KEY", "RecipeFile", "load_config", "read_recipe_chain"]


def _long_names(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Config key (dashes and underscores both) -> action, for every long flag and DATA."""
    names: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in ("help", "config"):
            continue
        keys = [opt[2:] for opt in action.option_strings if opt.startswith("--")]
        if not action.option_strings:
            keys = [action.dest]
        for key in keys:
            names[key] = action
            names[key.replace("-", "_")] = action
    return names


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60


def _shown(value: Any) -> str:
    """A bounded repr for error messages: a YAML alias bomb (nested lists of aliases, billions of items once
    expanded) is shown as a few items, never expanded."""
    return _SHOWN.repr(value)


def _check_config_value(parser: argparse.ArgumentParser, key: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(value, bool) and action.nargs == "?" and action.const is not None:
        return action.const if value else action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            parser.error(f"config key {key!r} must be true or false, got {_shown(value)}")
        return (not value) if isinstance(action, argparse._StoreFalseAction) else value
    multiple = action.nargs in ("+", "*")
    if value is None:
        if action.default is None:
            return None
        parser.error(f"config key {key!r}: null is not a value (leave the key out for its default, {action.default})")
    if isinstance(value, dict):
        parser.error(f"config key {key!r}: expected a single value, got a mapping")
    if isinstance(value, list) and not multiple:
        parser.error(f"config key {key!r}: expected a single value, got a list {_shown(value)}")
    items = value if isinstance(value, list) else [value]
    if multiple and not items:
        parser.error(f"config key {key!r}: expected at least one value, got an empty list")
    for item in items:
        if isinstance(item, (bool, list, dict)) or item is None:
            kind = "a number" if action.type not in (None, str) else "a string"
            parser.error(f"config key {key!r}: expected {kind}, got {_shown(item)}")
    if action.type is None:  # strings (paths, specs): YAML numbers are taken as written
        value = [str(v) for v in items] if multiple else str(value)
    if multiple and not isinstance(value, list):
        value = [value]
    convert = cast(Optional[Callable[[str], Any]], action.type)  # a callable in every parser here, never a name
    if isinstance(value, list) and convert is not None:
        try:
            value = [convert(str(v)) for v in value]
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"config key {key!r}: {exc}")
    elif value is not None and convert is not None and not isinstance(value, bool):
        try:
            value = convert(str(value))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"config key {key!r}: invalid value {_shown(value)} ({exc})")
    if action.choices is not None and value is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"config key {key!r}: invalid choice {_shown(value)} (choose from {choices})")
    return value


RECIPE_BASE_KEY = "base"  # the recipe key naming the recipe it inherits from (not a flag of any parser)


@dataclass(frozen=True)
class RecipeFile:
    """One YAML file of a recipe chain: its path (as reached from the ``--config`` file) and its keys, ``base:``
    left out."""

    path: str
    values: Dict[str, Any]


def _unique_key_loader() -> type:
    """A safe YAML loader that refuses a mapping with the same key twice (plain ``safe_load`` keeps the last one
    silently: a recipe with two ``lr:`` lines would train with whichever came last, unnoticed)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Dict[Any, Any]:
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                        key_node.start_mark)
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _read_yaml_mapping(path: str, what: str, error: Callable[[str], NoReturn]) -> Dict[Any, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.load(handle, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)
    except OSError as exc:
        error(f"cannot read {what}: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        error(f"cannot read {what}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})")
    except yaml.YAMLError as exc:
        error(f"{what} is not valid YAML: {' '.join(str(exc).split())}")
    if content is None:
        return {}
    if not isinstance(content, dict):
        error(f"{what} must hold a mapping of flag names to values")
    return content


def read_recipe_chain(path: str, error: Callable[[str], NoReturn]) -> List[RecipeFile]:
    """The recipe ``path`` and the recipes it inherits from through ``base:``, farthest base first, so that
    applying them in order lets each file override its base (and the command line override them all).

    ``base:`` is a path relative to the directory of the file that names it. A missing or unreadable base, a
    ``base:`` that is not a file name, and a cycle end in ``error`` (e.g. ``parser.error``: one line, exit 2)
    naming the files involved.
    """
    chain: List[RecipeFile] = []
    seen = set()  # real paths already read
    current, what = path, f"--config {path}"
    while True:
        real = os.path.realpath(current)
        if real in seen:
            cycle = " -> ".join([*(f.path for f in chain), current])
            error(f"--config {path}: base recipes form a cycle: {cycle}")
        seen.add(real)
        content = _read_yaml_mapping(current, what, error)
        base = content.pop(RECIPE_BASE_KEY, None)
        chain.append(RecipeFile(current, content))
        if base is None:
            return list(reversed(chain))
        if not isinstance(base, str) or not base.strip():
            error(f"--config {path}: 'base' in {current} must be the file name of a recipe, got {base!r}")
        following = os.path.normpath(os.path.join(os.path.dirname(current), base))
        what = f"base recipe {following} (named by {current})"
        current = following


def load_config(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """Read a YAML recipe (its ``base:`` chain applied) into ``{dest: value}``; unknown keys and bad values end
    in ``parser.error``. Works for any parser whose options are long flags (main.py's and the dense scripts')."""
    names = _long_names(parser)
    values: Dict[str, Any] = {}
    for recipe in read_recipe_chain(path, parser.error):
        unknown = sorted(str(key) for key in recipe.values if str(key) not in names)
        if unknown:
            parser.error(f"unknown key(s) in --config {recipe.path}: {', '.join(unknown)}")
        for key, value in recipe.values.items():
            if getattr(names[key], "command_line_only", False):  # marked by the flag's definition (add_trust_flag)
                flag = names[key].option_strings[0]
                parser.error(f"--config {recipe.path}: key {key!r} is accepted on the command line only (it lets a "
                             f"checkpoint run code, so a recipe cannot turn it on); pass {flag} yourself if you trust "
                             "the files")
            values[names[key].dest] = _check_config_value(parser, key, names[key], value)
    return values
