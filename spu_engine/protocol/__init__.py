"""Commands (client -> engine) and events (engine -> clients) as JSON lines, typed with pydantic.

- ``commands.py``: the commands, one model each, and the ``Command`` union that tells them apart by ``cmd``.
- ``events.py``: the events, one open model each, and ``EVENTS`` (type name -> model).
- ``codec.py``: the wire: ``parse_command`` for a client's line, ``event`` and ``encode`` to make and send one,
  ``read_event`` to read one back in a console.

Torch-free: consoles import it.
"""

from .codec import MAX_LINE_BYTES, ProtocolError, encode, event, parse_command, read_event
from .commands import (
    COMMAND_NAMES,
    ChangeCmd,
    CheckpointCmd,
    Command,
    EvaluateCmd,
    ExportCmd,
    HelloCmd,
    PauseCmd,
    PreviewCmd,
    ResumeCmd,
    ScheduleCmd,
    SetPolicyCmd,
    StopCmd,
    UndoCmd,
    UnscheduleCmd,
)
from .events import (
    EVENTS,
    AckEvent,
    CheckpointEvent,
    DisconnectedEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    GpuStats,
    HelloEvent,
    ImpRoundEvent,
    LogEvent,
    PolicyEvent,
    PreviewEvent,
    PruneEvent,
    RanksEvent,
    ReceivedEvent,
    ResumedEvent,
    ScheduledEvent,
    StateEvent,
    StepEvent,
    SystemEvent,
    TensorInfo,
    TensorStats,
    UnitInfo,
    UnitsEvent,
    UnitStats,
)

__all__ = [
    "COMMAND_NAMES", "EVENTS", "MAX_LINE_BYTES",
    "AckEvent", "ChangeCmd", "CheckpointCmd", "CheckpointEvent", "Command", "DisconnectedEvent", "ErrorEvent",
    "EvalEvent", "EvaluateCmd", "Event", "ExportCmd", "GpuStats", "HelloCmd", "HelloEvent", "ImpRoundEvent",
    "LogEvent", "PauseCmd", "PolicyEvent", "PreviewCmd", "PreviewEvent", "ProtocolError", "PruneEvent",
    "RanksEvent", "ReceivedEvent", "ResumeCmd", "ResumedEvent", "ScheduleCmd", "ScheduledEvent", "SetPolicyCmd",
    "StateEvent", "StepEvent", "StopCmd", "SystemEvent", "TensorInfo", "TensorStats", "UndoCmd", "UnitInfo",
    "UnitStats", "UnitsEvent", "UnscheduleCmd",
    "encode", "event", "parse_command", "read_event",
]
