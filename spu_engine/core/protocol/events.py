"""Events, engine -> clients: one pydantic model an event type, named in ``EVENTS``.

The engine builds every event through its model (``codec.event``), so a wrong shape fails where it is made.  The
models are open (``extra="allow"``) and every field but ``type`` has a default: a console reads an event of any
engine version (``codec.read_event``), keeping the fields it does not know and filling in those it misses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Open(BaseModel):
    """Keeps the fields it does not name (a newer engine's): every event and everything an event carries is one."""

    model_config = ConfigDict(extra="allow")


class Event(Open):
    """Fields every event has."""

    type: str
    t: float = 0.0
    step: int = 0


class TensorInfo(Open):
    name: str
    numel: int = 0
    shape: list[int] = Field(default_factory=list)
    trainable: bool = True


class UnitInfo(Open):
    """A unit (embeddings, blockN, head) and its tensors, by stable name."""

    name: str
    numel: int = 0
    params: list[TensorInfo] = Field(default_factory=list)


class HelloEvent(Event):
    """A snapshot to draw everything from scratch (a loading engine sends fewer fields)."""

    run: str | None = None
    run_dir: str | None = None
    pid: int | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    model_path: str | None = None
    task: str | None = None
    metric: str | None = None
    units: list[UnitInfo] = Field(default_factory=list)
    policy: dict[str, Any] | None = None  # replayable: state at step 0 and timeline
    current: dict[str, Any] | None = None  # the sections in force now
    scheduled: list[dict[str, Any]] | None = None  # pending timeline entries and triggers (see ScheduledEvent)
    state: str = "loading"
    total_steps: int | None = None
    trainable: int | None = None
    total_params: int | None = None
    device: str | None = None


class StateEvent(Event):
    """state: loading | training | paused | stopped | finished | error.  While loading, ``phase`` names what the
    engine does before its first step, in this order: engine (the process starts), data (tokenizing), model,
    checkpoint (resuming), optimizer; ``message`` says it for people."""

    state: str
    message: str = ""
    phase: str | None = None


class StepEvent(Event):
    """One optimizer step.  Methods add their fields: sb_kept_fraction, sb_backward, sb_skipped (selective backprop),
    wus_phase (weight-update skipping), pruning {method, sparsity, target, layout on stats steps, ...}."""

    loss: float | None = None  # None: the step was skipped (a non-finite loss or gradient; ``skipped``)
    grad_norm: float | None = None  # before clipping
    skipped: bool | None = None
    lr: float | None = None
    step_time: float | None = None
    samples_per_s: float | None = None
    samples: int | None = None
    batch_size: int | None = None  # examples per optimizer step (per rank)
    micro_batch: int | None = None  # examples per forward and backward (the batch over memory.grad_accum)
    trainable: int | None = None
    compiled: str | None = None  # --compile, on a step whose model compiled: compiled | recompiled | limit (refused)
    compiles: int | None = None  # with ``compiled``: the model's compiles so far, of ``compile_limit`` (torch's limit)
    compile_limit: int | None = None


class PruneEvent(Event):
    """One IMP round: prune, then reset the survivors."""

    method: str = ""
    round: int = 0
    rounds: int = 0
    sparsity: float = 0.0
    reset: str = ""


class ImpRoundEvent(Event):
    """One IMP round trained to its end (``step``): round 0 is the mask before the first pruning, round k the mask
    after k prunings.  ``kept_by_tensor`` / ``kept_by_unit``: the share of each target tensor's (each unit's target)
    weights still in the mask; ``eval``: the evaluation at the round's end (empty when none ran); ``seconds``: wall
    time from the round's start to the end of that evaluation, ``train_seconds``: its steps alone."""

    round: int = 0
    rounds: int = 0
    start_step: int = 0
    steps: int = 0
    sparsity: float = 0.0
    train_loss: float | None = None
    eval: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0
    kept_by_tensor: dict[str, float] = Field(default_factory=dict)
    kept_by_unit: dict[str, float] = Field(default_factory=dict)


class UnitStats(Open):
    trainable: float = 1.0
    grad_norm: float = 0.0
    update_ratio: float = 0.0
    sparsity: float = 0.0


class TensorStats(Open):
    trainable: bool = True
    sparsity: float = 0.0


class UnitsEvent(Event):
    units: dict[str, UnitStats] = Field(default_factory=dict)
    tensors: dict[str, TensorStats] = Field(default_factory=dict)


class RanksEvent(Event):
    """AdaLoRA's rank of each adapted module (stable name, e.g. ``bert.encoder.layer.0.attention.self.query``) after
    step ``step``, and their sum, when the allocation changed them."""

    ranks: dict[str, int] = Field(default_factory=dict)
    budget: int = 0


class EvalEvent(Event):
    """eval_loss and the task's metrics (more float fields)."""

    eval_loss: float | None = None


class PolicyEvent(Event):
    """A change was applied.  ``units`` is set when the model's tensors changed (a PEFT method added or removed
    some)."""

    source: str = "?"
    change: dict[str, Any] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)
    trainable: int = 0
    trainable_by_unit: dict[str, float] = Field(default_factory=dict)
    frozen_tensors: list[str] | None = None
    units: list[UnitInfo] | None = None


class ScheduledEvent(Event):
    """What is still to come changed: the pending step entries and every trigger, each trigger with ``fired``, the
    steps it fired at (an entry as the policy's timeline writes it)."""

    scheduled: list[dict[str, Any]] = Field(default_factory=list)


class ReceivedEvent(Event):
    """Sent by the socket thread as soon as a valid command arrives (it applies later, at a step boundary)."""

    id: str | int | None = None
    cmd: str = "?"


class AckEvent(Event):
    """The command was applied (or refused, ``ok`` false) at this step boundary."""

    id: str | int | None = None
    cmd: str = "?"
    ok: bool = True
    message: str = ""


class MemoryFigures(Open):
    """Bytes one training step would hold (``runtime.memory_estimate``): weights (buffers included), gradients and
    optimizer state by dtype name, activations (None: no step measured yet) and their sum."""

    weights: dict[str, int] = Field(default_factory=dict)
    gradients: dict[str, int] = Field(default_factory=dict)
    optimizer: dict[str, int] = Field(default_factory=dict)
    activations: int | None = None
    total: int = 0


class MemoryPreview(Open):
    """A change's device memory, before -> after.  ``where``: ``device`` (CUDA) or ``RAM``; ``available``: the free
    memory plus what this run holds now; ``fits``: the after figure is within it; ``measured_step``: the step the
    activations were measured at; ``checkpointing``: the run recomputes activations (gradient checkpointing)."""

    where: str = "device"
    before: MemoryFigures = Field(default_factory=MemoryFigures)
    after: MemoryFigures = Field(default_factory=MemoryFigures)
    available: int | None = None
    fits: bool | None = None
    optimizer: str | None = None
    measured_step: int | None = None
    checkpointing: bool = False


class PreviewEvent(Event):
    """The answer to a ``preview`` command (see ``PolicyRuntime.preview``); ``error`` when the change would be
    refused."""

    id: str | int | None = None
    trainable: int | None = None
    total: int | None = None
    trainable_now: int | None = None
    backward: float | None = None
    frozen_prefix_backward: float | None = None
    sparsity: float | None = None
    notes: list[str] = Field(default_factory=list)
    memory: MemoryPreview | None = None
    error: str | None = None


class ErrorEvent(Event):
    """Faults add ``kind``: nonfinite (loss, units, weights, action), oom (suggested), checkpoint."""

    message: str = "?"
    id: str | int | None = None
    kind: str | None = None


class CheckpointEvent(Event):
    path: str = ""


class ResumedEvent(Event):
    """Events with a larger step logged before this one are superseded."""

    checkpoint: str | None = None
    message: str = ""


class GpuStats(Open):
    """One CUDA device.  ``utilization`` (percent) and ``memory_used`` (the whole device, every process) come from
    NVML when it is installed (``memory_used`` otherwise from the driver's free memory); ``allocated``
    and ``reserved`` are this process's tensors as the torch allocator counts them now, ``max_allocated`` the highest
    ``allocated`` since the previous sample (the peak per window).  Bytes."""

    name: str | None = None
    utilization: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    allocated: int | None = None
    reserved: int | None = None
    max_allocated: int | None = None


class RankReading(Open):
    """One rank's own reading (``SystemEvent.ranks``): its throughput over its training time since the last sample,
    and its memory in GiB: the torch allocator's on a GPU (``peak_memory_gb`` the highest since the last sample),
    else the process's RSS (``peak_memory_gb`` the highest since the process began)."""

    rank: int = 0
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    memory_gb: float | None = None
    peak_memory_gb: float | None = None


class SystemEvent(Event):
    """The machine and the run's speed, sampled every ``system_every`` seconds of the run.  ``samples_per_s`` and
    ``tokens_per_s`` (non-padding tokens of the batches trained) are over the training time of the steps since the
    last sample (``seconds``), rank 0's counts times ``world_size``; ``cpu_process`` is percent of one core
    (``top``'s), ``cpu_machine`` of all ``cpu_count`` cores; ``rss`` and ``ram_*`` in bytes, all of rank 0's
    process and machine.  ``gpus`` (keyed by CUDA index) is absent on a machine without one.  ``world_size`` and
    ``ranks`` (one reading a rank, by rank) are absent from engines older than them."""

    seconds: float = 0.0
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    cpu_process: float | None = None
    cpu_machine: float | None = None
    cpu_count: int | None = None
    rss: int | None = None
    ram_used: int | None = None
    ram_total: int | None = None
    gpus: dict[str, GpuStats] | None = None
    world_size: int | None = None
    ranks: list[RankReading] | None = None


class LogEvent(Event):
    """A message; ``about`` names what some messages are, for a client that shows those alone: ``generation`` (an
    SFT evaluation's generated answer)."""

    level: str = "info"
    message: str = ""
    about: str = ""


HEARTBEAT_S = 2.0  # the socket says this much quiet with a heartbeat: a console tells a quiet engine from a silent one


class HeartbeatEvent(Event):
    """Sent by the socket thread to every client when nothing else was sent for ``HEARTBEAT_S`` (a paused run, a long
    step, loading), never logged: a console that hears nothing for a few of these knows the engine is silent (stopped,
    hung, its machine gone) rather than quiet."""


class DisconnectedEvent(Event):
    """Made by the client when the socket closes."""

    message: str = ""


EVENTS: dict[str, type[Event]] = {
    "hello": HelloEvent,
    "state": StateEvent,
    "step": StepEvent,
    "prune": PruneEvent,
    "imp_round": ImpRoundEvent,
    "units": UnitsEvent,
    "eval": EvalEvent,
    "ranks": RanksEvent,
    "policy": PolicyEvent,
    "scheduled": ScheduledEvent,
    "received": ReceivedEvent,
    "ack": AckEvent,
    "preview": PreviewEvent,
    "error": ErrorEvent,
    "checkpoint": CheckpointEvent,
    "resumed": ResumedEvent,
    "system": SystemEvent,
    "log": LogEvent,
    "heartbeat": HeartbeatEvent,
    "disconnected": DisconnectedEvent,
}
