"""Messages as JSON lines: a command read from a client's line, an event made and encoded, an event read back.

Every message is one JSON object on one line.  An invalid command becomes a ``ProtocolError`` (the engine answers
the client that sent it with an ``error`` event), never an exception in the engine.  ``read_event`` takes what it
knows from an event of any engine version and answers None for one it cannot read, rather than raising.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ValidationError

from spu_engine.core.protocol.commands import COMMAND, COMMAND_NAMES
from spu_engine.core.protocol.events import EVENTS, Event
from spu_engine.core.validation import error_text

MAX_LINE_BYTES = 1 << 20  # a command larger than this is refused unread


class ProtocolError(ValueError):
    """A message that is not a valid command; the text says why."""


def parse_command(line: bytes | str) -> Any:
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError(f"message of {len(line)} bytes exceeds the {MAX_LINE_BYTES} byte limit")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8") from None
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"message is not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(data).__name__}")
    if data.get("cmd") not in COMMAND_NAMES:
        raise ProtocolError(f"unknown cmd {data.get('cmd')!r}; commands are {', '.join(COMMAND_NAMES)}")
    try:
        return COMMAND.validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "message"
        value = first.get("input")
        got = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        raise ProtocolError(f"{data['cmd']}: {where}: {error_text(first)}{got}") from None


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=_default) + "\n").encode("utf-8")


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", exclude_none=True)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def event(type_: str, **fields: Any) -> dict[str, Any]:
    """An event as a plain dict, checked against its model (a wrong shape raises here, where it is made)."""
    ev = {"type": type_, "t": round(time.time(), 4), **fields}
    EVENTS[type_].model_validate(ev)
    return ev


def read_event(data: Any) -> Event | None:
    """The typed event in ``data``, or None when it is not one this console can read (unknown type, wrong shape)."""
    if not isinstance(data, dict):
        return None
    model = EVENTS.get(data.get("type"))  # type: ignore[arg-type]
    if model is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None
