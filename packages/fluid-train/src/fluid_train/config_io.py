"""Reading configs from plain values: files (JSON, TOML), flags and ``KEY=VALUE`` overrides.

``config_from_dict(cls, values)`` builds any config dataclass of Fluid from nested plain values
and names the dotted key and what it expected when a value does not fit; ``with_overrides``
turns dotted keys into nested ones; ``replace_given`` applies keyword overrides to an options
object. Importable without torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "check_choices",
    "config_from_dict",
    "load_config_file",
    "merge",
    "replace_given",
    "with_overrides",
]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The values of a ``.json`` or ``.toml`` config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        with path.open("rb") as f:
            return tomllib.load(f)
    if path.suffix == ".json":
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object; got {type(values)}")
        return values
    raise ValueError(f"config file {path} must end in .json or .toml")


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``overrides`` win; nested dicts merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def with_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``overrides`` merged in; a key ``"a.b"`` sets ``values["a"]["b"]``."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, name = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {parent!r} is set to a value, not a table")
        node[name] = value
    return merge(values, nested)


def replace_given(base: Any, overrides: Mapping[str, Any], *, what: str) -> Any:
    """``base`` (a config dataclass) with the non-None ``overrides`` replaced: each checked
    against its field's type as ``config_from_dict`` checks it (ValueError naming the field),
    then the whole by ``__post_init__``. A name that is not one of its fields raises TypeError
    naming ``what`` and the fields. No overrides: ``base`` itself. None means "not given", as a
    flag left out is."""
    names = [f.name for f in dataclasses.fields(base)]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(
            f"unknown {what}(s) {unknown}; expected {type(base).__name__} fields {names}"
        )
    if not given:
        return base
    hints = typing.get_type_hints(type(base))
    return dataclasses.replace(base, **{k: _coerce(hints[k], v, k) for k, v in given.items()})


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """The (name, choices) of ``cls``'s fields typed as a ``Literal`` (or an optional one)."""
    fields = []
    for name, hint in typing.get_type_hints(cls).items():
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is Literal:
            fields.append((name, typing.get_args(hint)))
        elif len(options) == 1 and typing.get_origin(options[0]) is Literal:
            fields.append((name, (*typing.get_args(options[0]), None)))
    return tuple(fields)


def check_choices(config: Any, *, where: str = "") -> None:
    """Raise ValueError naming the field when a ``Literal``-typed field of ``config`` holds
    none of its choices: the check every config's ``__post_init__`` makes of its choices."""
    for name, choices in _choice_fields(type(config)):
        value = getattr(config, name)
        if value not in choices:
            raise ValueError(f"{where}{name} must be one of {list(choices)}; got {value!r}")


def config_from_dict(cls: type, values: Mapping[str, Any], *, where: str = "") -> Any:
    """An instance of dataclass ``cls`` from nested plain values (JSON, TOML, flags).

    Nested dataclasses come from tables; lists become tuples where a tuple is expected and ints
    become floats where a float is. An unknown key, a value of the wrong type or a choice
    outside a ``Literal`` raises ValueError naming the dotted key and what was expected.
    """
    if not isinstance(values, Mapping):
        raise ValueError(
            f"{where or 'config'} must be a table of {cls.__name__} fields; got {values!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {', '.join(where + k for k in unknown)}; "
            f"expected some of {', '.join(where + k for k in fields)}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field missing
        raise ValueError(f"{where.rstrip('.') or cls.__name__}: {error}") from error


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """``value`` as type ``hint`` (recursing into dataclasses), or a ValueError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {args}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping) and callable(getattr(hint, "from_dict", None)):
            return hint.from_dict(value)  # a config that reads its own saved format
        return config_from_dict(hint, value, where=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}; got {value!r}")
        return value
    if origin is list and isinstance(value, str):
        value = [value]  # one item where a list is expected (a single shard, say)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{key} must have {len(args)} items; got {value!r}")
            return tuple(
                _coerce(a, v, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number; got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer; got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false; got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string; got {value!r}")
        return value
    return value
