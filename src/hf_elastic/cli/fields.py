"""Command-line options generated from the fields of the config dataclasses, as trl's `TrlParser` builds its CLI over
`HfArgumentParser`: an option's type, default, help and choices come from its field, so they are declared once."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_FIELD = object()  # the option's default is its field's


@dataclass(frozen=True)
class Option:
    """How one field of a config dataclass appears on the command line.

    Args:
        name: the field (also the `argparse` dest).
        flags: the option strings; default `--<name with dashes>`.
        type: parses one value (e.g. a positive int); default: from the field's annotation.
        default: the command line's own default, where it deliberately differs from the field's.
        choices: allowed values, where the field's metadata declares none.
        unset: leave the option `None` when absent, so that the config's own default applies (for a field that only
            some configs of the command have).
        note: appended to the field's help (what the command line adds, e.g. an accepted spelling).
    """

    name: str
    flags: tuple[str, ...] = ()
    type: Callable[[str], Any] | None = None
    default: Any = _FIELD
    choices: Sequence[Any] | None = None
    unset: bool = False
    note: str = ""


def field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _annotation(cls: type, name: str) -> Any:
    """The field's type, with `None` dropped from a union; a list wins over a scalar (`target_modules: str |
    list[str]`), then an Enum (whose values become the choices)."""
    hint = _hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        listed = [a for a in args if typing.get_origin(a) in (list, tuple)]
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        hint = (listed or enums or args)[0]
    return hint


def _kwargs_for(cls: type, f: dataclasses.Field, option: Option) -> dict[str, Any]:
    """The `add_argument` keyword arguments of `option` on field `f` of `cls`."""
    hint = _annotation(cls, f.name)
    default = field_default(f) if option.default is _FIELD else option.default
    kwargs: dict[str, Any] = {"dest": f.name, "default": None if option.unset else default}
    choices = option.choices or f.metadata.get("choices")
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        return kwargs
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        kwargs["nargs"] = "*" if origin is tuple else "+"
        hint = typing.get_args(hint)[0]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices, hint = choices or [e.value for e in hint], str
    kwargs["type"] = option.type or (hint if hint in (int, float, str) else str)
    if choices is not None:
        kwargs["choices"] = list(choices)
    return kwargs


def add_options(parser: argparse.ArgumentParser, cls: type, options: Iterable[Option]) -> None:
    """Add one option per `Option` on a field of the dataclass `cls`; its help is the field's, plus the default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for option in options:
        f = fields[option.name]
        kwargs = _kwargs_for(cls, f, option)
        shown = field_default(f) if option.default is _FIELD else option.default
        text = " ".join(part for part in (f.metadata.get("help", ""), option.note) if part)
        text = text.replace("%%", "%").replace("%", "%%")  # transformers escapes its help for argparse, we do not
        flags = option.flags or ("--" + option.name.replace("_", "-"),)
        if kwargs.get("action") is None and "choices" not in kwargs:
            kwargs["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()
        action = parser.add_argument(*flags, help=f"{text} (default: {_text(shown)})", **kwargs)
        action.config_field = (cls, option.name, shown)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value.value if isinstance(value, enum.Enum) else value)


def config_kwargs(args: argparse.Namespace, cls: type, options: Iterable[Option]) -> dict[str, Any]:
    """The fields of `cls` that `options` set on `args`; `None` where the field's default is not `None` means "not
    given", so the field keeps its default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for option in options:
        value = getattr(args, option.name)
        if value is None and field_default(fields[option.name]) is not None:
            continue
        out[option.name] = value
    return out
