"""Flags: value types that refuse a bad number in one line, and flag groups generated from config dataclasses.

Each setting is written once, as a field of its config dataclass (its metadata holds the flag's
type and help): :func:`add_fields` makes the flags, :func:`build` the config from the parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn


def number(kind: type, minimum: float, *, inclusive: bool = True, below: float | None = None) -> Any:
    """An argparse ``type``: text to a finite ``kind`` in [minimum, below) (or (minimum, ...) if not inclusive)."""
    what = "an integer" if kind is int else "a finite number"
    what += f" in [{minimum:g}, {below:g})" if below is not None else f" {'>=' if inclusive else '>'} {minimum:g}"

    def convert(text: str) -> Any:
        try:
            value = kind(text)
            fits = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
        except ValueError:
            fits = False
        if not fits or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


COUNT = number(int, 1)  # sizes, steps, epochs
NATURAL = number(int, 0)  # seeds, budgets; 0 allowed
POSITIVE = number(float, 0, inclusive=False)  # learning rate, radii
NON_NEGATIVE = number(float, 0)  # 0 turns it off
FRACTION = number(float, 0, below=1)
FINITE = number(float, -math.inf, inclusive=False)


def option(default: Any, kind: Callable[[str], Any] | None = None, help: str = "", flag: str | None = None) -> Any:
    """A config field that is also a flag: its default, value type, help and flag name (else the field's)."""
    return dataclasses.field(default=default, metadata={"type": kind, "help": help, "flag": flag})


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and negative numbers read as values: argparse takes ``-1e-5``
    for an option name (its pattern knows only ``-1`` and ``-.5``); here it reaches the range check."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"advfunc: error: {message}\n")
        raise SystemExit(2)


def _value_type(hint: Any) -> tuple[Callable[[str], Any] | None, dict[str, Any]]:
    """The argparse ``type`` and extra keywords for a field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return None, {"choices": args}
    if origin is tuple:
        kind, _ = _value_type(args[0])
        return kind, {"nargs": "+"}
    if args and type(None) in args:  # X | None
        return _value_type(next(a for a in args if a is not type(None)))
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return {int: NATURAL, float: FINITE, str: str}.get(hint), {}


def add_fields(
    group: Any,
    config: type,
    *,
    prefix: str = "",
    names: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
) -> None:
    """A flag ``--{names[field] or its flag metadata or prefix + field}`` (into ``prefix`` + field) for each field
    of the dataclass ``config`` in ``only``, none in ``skip``; ``defaults`` replace fields' (None: a preset's)."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        meta = field.metadata
        flag = (names or {}).get(field.name) or meta.get("flag") or (prefix + field.name).replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[operator]
        default = (defaults or {}).get(field.name, default)
        kind, extra = _value_type(hints[field.name])
        kind = meta.get("type") or kind
        shown = " (default: %(default)s)" if default is not None else ""
        text = (meta.get("help") or field.name.replace("_", " ")).replace("%", "%%") + shown
        if kind is not None and "action" not in extra:
            extra["type"] = kind
        value = list(default) if isinstance(default, tuple) else default
        group.add_argument(f"--{flag}", dest=prefix + field.name, default=value, help=text, **extra)


def build(config: type, args: argparse.Namespace, *, prefix: str = "", **given: Any) -> Any:
    """The dataclass ``config`` from the flags :func:`add_fields` added (``given`` wins); tuples restored."""
    hints = typing.get_type_hints(config)
    names = [f.name for f in dataclasses.fields(config) if f.name not in given and hasattr(args, prefix + f.name)]
    values = {name: getattr(args, prefix + name) for name in names}
    tuples = {name: tuple(v) for name, v in values.items() if typing.get_origin(hints[name]) is tuple and v is not None}
    return config(**{**values, **tuples, **given})
