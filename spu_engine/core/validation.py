"""pydantic's validation errors, said as SPU says every error (which key, what is wrong, in one line), and the strict
base every policy section validates with."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def error_text(error: dict[str, Any]) -> str:
    """The message of one pydantic error, without pydantic's "Value error, " prefix for our own checks; a boolean
    (strict: "yes", 1 or "true" would be a guess) names what it got."""
    if error.get("type") == "bool_type":
        return "must be true or false (a boolean, not a string or a number)"
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


class Section(BaseModel):
    """The base of every policy section (the policy's own and each method's): an unknown key, a non-finite number or
    an invalid assignment is an error.  It lives here, outside ``policy``, so a method's settings module can build on
    it without importing the policy, which is assembled from those modules."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def name_globs(self) -> dict[str, list[str]]:
        """Key -> globs over parameter names that must each select something in the model (checked at load and
        at each timeline entry); none by default."""
        return {}

    @classmethod
    def applicable(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The keys of (part of) this section that apply, given the values it holds: all, unless a section's fields
        belong to some of its methods only (a change is then described by what it does, not by every field sent)."""
        return values
