"""The policy's error, and pydantic's validation errors said as one line per key path."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from spu_engine.core.validation import error_text, key_path


class PolicyError(ValueError):
    """A user error in a policy: the message names the key path and the offending value."""


def format_validation_error(
    err: ValidationError, source: str, prefix: str = "", model: type[BaseModel] | None = None
) -> str:
    """One line per error naming the key path (``prefix`` + the path inside the validated data) and the value;
    an unknown key of ``model`` (what was validated) with the nearest allowed key and the allowed ones."""
    lines = [f"{source}: invalid policy"]
    for e in err.errors():
        parts = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if e["type"] == "extra_forbidden":
            lines.append("  " + unknown_key(parts, prefix, model))
            continue
        value = e.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"  {prefix + key_path(parts)}: {error_text(e)}{shown}")
    return "\n".join(lines)


def unknown_key(loc: tuple[Any, ...], prefix: str, model: type[BaseModel] | None) -> str:
    """``unknown key 'keeep' in selective_backprop; did you mean 'keep'? Allowed: mode, keep, ...``."""
    key = str(loc[-1])
    parent = prefix + key_path(loc[:-1]) if len(loc) > 1 else prefix.rstrip(".")
    text = f"unknown key {key!r} " + (f"in {parent}" if parent else "at the top level")
    allowed = keys_at(model, loc[:-1]) if model is not None else []
    guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if guess:
        text += f"; did you mean {guess[0]!r}?"
    if allowed:
        text += f"{'' if guess else ';'} Allowed: {', '.join(allowed)}"
    return text


def keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the mapping at ``loc`` inside ``model`` may hold (the fields of the section found there)."""
    kinds: list[Any] = [model]
    for part in loc:
        kinds = [inner for kind in kinds for inner in _inside(kind, part)]
    keys: dict[str, None] = {}
    for member in [member for kind in kinds for member in _members(kind)]:
        if isinstance(member, type) and issubclass(member, BaseModel):
            keys.update(dict.fromkeys(member.model_fields))
    return list(keys)


def _inside(kind: Any, part: Any) -> list[Any]:
    """What sits at ``part`` (a key or a list index) of a value of type ``kind``: options, lists, mappings, models."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        return _inside(args[0], part)
    if origin in (typing.Union, types.UnionType):
        named = [a for a in args if getattr(a, "__name__", None) == part]  # pydantic names a union's member
        return named or [inner for a in args if a is not type(None) for inner in _inside(a, part)]
    if isinstance(part, int):
        return [args[0]] if origin in (list, tuple, set) and args else []
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        field = kind.model_fields.get(part)
        return [field.annotation] if field is not None else []
    return [args[1]] if origin is dict and len(args) == 2 else []


def _members(kind: Any) -> list[Any]:
    """The types a value of ``kind`` may be: a union's (an option's) members, an annotated type's own."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        return _members(args[0])
    if origin in (typing.Union, types.UnionType):
        return [member for a in args for member in _members(a)]
    return [kind]
