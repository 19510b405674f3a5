"""Commands, client -> engine: one pydantic model a command, told apart by its ``cmd`` field.

A command names no unknown field (``extra="forbid"``): a typo is refused, never ignored.  ``parse_command``
(``codec.py``) reads one from a line; the engine's command table (``spu_engine/loop/commands.py``) applies it.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, TypeAdapter

from spu_engine.core.policy import Change, Policy, TimelineEntry


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | int | None = Field(None, description="echoed in the ack so a client can match replies")


class ChangeCmd(_Cmd):
    """Append freeze rules and/or merge policy sections at the next step boundary."""

    cmd: Literal["change"]
    change: Change


class SetPolicyCmd(_Cmd):
    """Replace the current sections whole (its timeline, if any, is ignored)."""

    cmd: Literal["set_policy"]
    policy: Policy


class PreviewCmd(_Cmd):
    """What would ``change`` do?  Answered at once with a ``preview`` event to this client only; nothing changes."""

    cmd: Literal["preview"]
    change: Change


class UndoCmd(_Cmd):
    """Undo the last change a client made, as a new change that restores the sections before it (so replay stays
    exact)."""

    cmd: Literal["undo"]


class ScheduleCmd(_Cmd):
    """Add a timeline entry or a trigger (at a step or epoch still to come, or when a metric meets a condition)."""

    cmd: Literal["schedule"]
    entry: TimelineEntry


class UnscheduleCmd(_Cmd):
    """Remove a pending timeline entry or a trigger, given as the ``scheduled`` event lists it."""

    cmd: Literal["unschedule"]
    entry: TimelineEntry


class PauseCmd(_Cmd):
    cmd: Literal["pause"]


class ResumeCmd(_Cmd):
    cmd: Literal["resume"]


class StopCmd(_Cmd):
    cmd: Literal["stop"]
    checkpoint: StrictBool = True


class CheckpointCmd(_Cmd):
    cmd: Literal["checkpoint"]


class EvaluateCmd(_Cmd):
    cmd: Literal["evaluate"]


class ExportCmd(_Cmd):
    """Write the replayable policy (state at step 0 + timeline) to ``path``: a new file, or with ``overwrite``
    (which the console sends only after asking) an existing one, whose mode is kept."""

    cmd: Literal["export"]
    path: str
    overwrite: StrictBool = False


class HelloCmd(_Cmd):
    """Ask for a fresh ``hello`` snapshot (sent automatically on connect)."""

    cmd: Literal["hello"]


COMMANDS: tuple[type[_Cmd], ...] = (
    ChangeCmd,
    SetPolicyCmd,
    PreviewCmd,
    UndoCmd,
    ScheduleCmd,
    UnscheduleCmd,
    PauseCmd,
    ResumeCmd,
    StopCmd,
    CheckpointCmd,
    EvaluateCmd,
    ExportCmd,
    HelloCmd,
)
COMMAND_NAMES = tuple(get_args(model.model_fields["cmd"].annotation)[0] for model in COMMANDS)
Command = Annotated[Union[COMMANDS], Field(discriminator="cmd")]  # noqa: UP007 - a union of the tuple above
COMMAND = TypeAdapter(Command)  # validates a decoded message as the command its ``cmd`` names
