"""Command-line flags made from config dataclasses: a field's flag, type, choices, default and
help are read from the field (its ``metadata["help"]``, and ``flag``/``metavar`` when the flag
is not ``--<field-name>``), so nothing is restated here.

Every flag defaults to "not given" (None), so the values of a ``--config`` file are overridden
only by the flags a user typed; :func:`given_values` returns those as the nested dict that
``fluid_train.config.config_from_dict`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

__all__ = ["add_config_flags", "given_values"]


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    nested: bool = True,
    show_defaults: bool = True,
) -> None:
    """One flag per field of ``cls`` (and, with ``nested``, of its nested config fields) that
    has help metadata.

    The flag's destination is the field's dotted path (``optim.lr``); booleans that default to
    True become ``--no-<name>``, those that default to False ``--<name>``, and those that default
    to None (decided later) both.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and "help" not in f.metadata:
            if nested:
                add_config_flags(
                    parser, hint, prefix=f"{prefix}{f.name}.", show_defaults=show_defaults
                )
            continue
        if "help" not in f.metadata:
            continue
        dest, default = f"{prefix}{f.name}", _default(f)
        name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        kind = _unwrap_optional(hint)
        if kind is bool:
            if default is None:  # unset means "decide for me": --name and --no-name
                parser.add_argument(
                    name, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                    help=help_text,
                )  # fmt: skip
            elif default is True:
                parser.add_argument(
                    f.metadata.get("flag") or f"--no-{f.name.replace('_', '-')}",
                    dest=dest, action="store_const", const=False, default=None,
                    help=f"do not {help_text}",
                )  # fmt: skip
            else:
                parser.add_argument(
                    name, dest=dest, action="store_const", const=True, default=None, help=help_text
                )
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": None}
        if default is dataclasses.MISSING:
            help_text += " (required)"
        elif show_defaults and default not in (None, [], ()):
            help_text += f" (default: {default})"
        kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        origin = typing.get_origin(kind)
        if origin is Literal:
            kwargs["choices"] = typing.get_args(kind)
            del kwargs["metavar"]
        elif origin in (list, tuple):
            (inner, *_) = typing.get_args(kind) or (str,)
            kwargs["nargs"] = "+"
            kwargs["type"] = inner
        elif kind in (int, float, str):
            kwargs["type"] = kind
        else:  # pragma: no cover - a config field with help must have a flag type
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {hint!r}")
        parser.add_argument(name, help=help_text, **kwargs)


def given_values(
    args: argparse.Namespace, cls: type, *, prefix: str = "", nested: bool = True
) -> dict[str, Any]:
    """The flags of :func:`add_config_flags` the user gave, as nested values for ``cls``."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and "help" not in f.metadata:
            inner = given_values(args, hint, prefix=f"{prefix}{f.name}.") if nested else {}
            if inner:
                values[f.name] = inner
        elif "help" in f.metadata:
            value = getattr(args, f"{prefix}{f.name}", None)
            if value is not None:
                values[f.name] = value
    return values
