"""The policy's error, and pydantic's validation errors said as one line per key path."""

from __future__ import annotations

from pydantic import ValidationError

from spu_engine.core.validation import error_text, key_path


class PolicyError(ValueError):
    """A user error in a policy: the message names the key path and the offending value."""


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per error naming the key path (``prefix`` + the path inside the validated data) and the value."""
    lines = [f"{source}: invalid policy"]
    for e in err.errors():
        loc = prefix + key_path(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        msg = error_text(e)
        if e["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else "(top level)"
            lines.append(f"  {loc}: unknown key (not allowed in {parent})")
            continue
        value = e.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)
