"""Commands (client -> engine) and events (engine -> clients) as JSON lines.

Every message is one JSON object on one line.  Commands are validated here;
an invalid one becomes an ``error`` event for the client that sent it, never
an exception in the engine.  Events are plain dicts with ``type``, ``t``
(unix time) and usually ``step``; their fields are listed in EVENT_FIELDS.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .policy import Change, Policy

MAX_LINE_BYTES = 1 << 20  # a command larger than this is refused unread


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


class PauseCmd(_Cmd):
    cmd: Literal["pause"]


class ResumeCmd(_Cmd):
    cmd: Literal["resume"]


class StopCmd(_Cmd):
    cmd: Literal["stop"]
    checkpoint: bool = True


class CheckpointCmd(_Cmd):
    cmd: Literal["checkpoint"]


class EvaluateCmd(_Cmd):
    cmd: Literal["evaluate"]


class ExportCmd(_Cmd):
    """Write the replayable policy (state at step 0 + timeline) to ``path``: a new file, or with ``overwrite``
    (which the console sends only after asking) an existing one, whose mode is kept."""

    cmd: Literal["export"]
    path: str
    overwrite: bool = False


class HelloCmd(_Cmd):
    """Ask for a fresh ``hello`` snapshot (sent automatically on connect)."""

    cmd: Literal["hello"]


Command = Annotated[
    Union[ChangeCmd, SetPolicyCmd, PauseCmd, ResumeCmd, StopCmd, CheckpointCmd, EvaluateCmd, ExportCmd, HelloCmd],
    Field(discriminator="cmd"),
]
_COMMAND = TypeAdapter(Command)
COMMAND_NAMES = ("change", "set_policy", "pause", "resume", "stop", "checkpoint", "evaluate", "export", "hello")


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
        return _COMMAND.validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "message"
        raise ProtocolError(f"{data['cmd']}: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=_default) + "\n").encode("utf-8")


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", exclude_none=True)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def event(type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "t": round(time.time(), 4), **fields}


EVENT_FIELDS = {
    "hello": "run, pid, config, units, policy, state, step, total_steps, metric, task",
    "state": "state (loading|training|paused|stopped|finished|error), step, message",
    "step": "step, loss, lr, samples_per_s, step_time, trainable, samples; selective backprop: sb_kept_fraction "
    "(selected / drawn this step), sb_backward (samples in this step's backward), sb_skipped (drawn and never "
    "backpropagated, cumulative); weight-update skipping: wus_phase (full | bias_only); pruning: pruning {method, "
    "sparsity (of the targets), target (scheduled now), pruning_round (imp), pruning_threshold (soft movement), "
    "layout {unit: {q|k|v|qkv|o|ffn_in|ffn_out|other: pruned fraction}} on stats steps}",
    "prune": "step, method, round, rounds, sparsity, reset: one IMP round (prune, then reset survivors)",
    "units": "step, units {name: {trainable, grad_norm, update_ratio, sparsity}}, tensors {name: {trainable, sparsity}}",
    "eval": "step, eval_loss and the task's metrics",
    "policy": "step, source, change, policy (current sections), trainable, trainable_by_unit",
    "received": "id, cmd: sent by the socket thread as soon as a valid command arrives (applied later, at a boundary)",
    "ack": "id, cmd, step, ok, message: the command was applied (or refused) at this step boundary",
    "error": "message, step, id; faults add kind: nonfinite (loss, units and weights: non-finite unit names, "
    "action: skip|pause|stop) or oom (suggested {batch_size | eval_batch_size: smaller size})",
    "checkpoint": "step, path",
    "resumed": "step, checkpoint, message: events with a larger step logged before this one are superseded",
    "log": "level, message, step",
}
