"""Strict conversion between config dataclasses and JSON-safe dicts.

Checkpoints and runs store configs as JSON. Loading one must refuse unexpected keys or
types with a clear error instead of silently building a different model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config dict that does not match its dataclass (unknown key, wrong type)."""


def to_dict(config: Any) -> dict[str, Any]:
    """Dataclass -> JSON-safe dict (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: Any, *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types.

    ``where`` names the source (a file path, say) in error messages.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}: {cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid {cls.__name__}: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a (simple) type hint; lists become tuples where a tuple is wanted."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                if arg is not type(None):
                    errors.append(str(exc))
        if len(errors) == 1:  # ``X | None`` given a bad X: say what is wrong with it
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=where)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint in (str, bool):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected an object, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {hint}")
