"""Strict conversion between frozen config dataclasses, plain dicts and YAML.

Every quarl config is a frozen dataclass; YAML is only its serialized form. The loader is strict: an unknown key is
an error that names the nearest valid key (``difflib``), because a silently dropped key is one of the ways RL
experiments lie (a per-layer sigma read from a key that nothing set ran with no per-layer sigma at all).

Nested dataclass fields are converted recursively; tuples are written as YAML lists and read back as tuples.
This module imports nothing from quarl, so every subpackage may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def nearest(name: str, valid: typing.Iterable[str]) -> str | None:
    """Return the valid name closest to ``name`` (or None when nothing is close)."""
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_key_error(key: str, valid: typing.Iterable[str], where: str) -> ValueError:
    """A ValueError for an unknown key that names the nearest valid one and lists them all."""
    valid = sorted(valid)
    hint = nearest(key, valid)
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    return ValueError(f"unknown key {key!r} in {where}{did_you_mean}; valid keys: {', '.join(valid)}")


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain dict/list/scalars; tuples as lists, enums as their values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated field type (dataclasses and tuples; scalars pass through)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(item, v, where) for v in value)
    return value


def from_dict(cls: type[T], data: dict, where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a nearest-key hint."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise unknown_key_error(key, fields, where)
    kwargs = {k: _coerce(hints.get(k, Any), v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def dump_yaml(obj: Any, path: str | Path | None = None, header: str | None = None) -> str:
    """Serialize a config dataclass to YAML (optionally writing it, with a ``# header`` comment first)."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    if path is not None:
        Path(path).write_text(text)
    return text


def load_yaml(cls: type[T], source: str | Path) -> T:
    """Load a config dataclass from a YAML file path or a YAML string, strictly."""
    text = Path(source).read_text() if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and Path(source).exists()
    ) else str(source)
    data = yaml.safe_load(text) or {}
    return from_dict(cls, data)


def coerce_block(cls: type[T], value: Any, where: str, shorthand: str, expected: str) -> T | None:
    """A nested config block given as None, an instance, a shorthand string (``cls(**{shorthand: value})``) or a
    mapping (strict keys); anything else is a ValueError naming ``where`` and what was ``expected``."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, str):
        return cls(**{shorthand: value})
    if isinstance(value, dict):
        return from_dict(cls, value, where)
    raise ValueError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")
