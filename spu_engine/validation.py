"""pydantic's validation errors, said as SPU says every error: which key, what is wrong, in one line."""

from __future__ import annotations

from typing import Any


def error_text(error: dict[str, Any]) -> str:
    """The message of one pydantic error, without pydantic's "Value error, " prefix for our own checks."""
    return str(error["msg"]).removeprefix("Value error, ")


def key_path(loc: tuple[Any, ...]) -> str:
    """A location as the YAML key path: ``pruning.schedule.final_sparsity``, ``freeze[2].layers``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"
