"""What the console knows about a run, rebuilt from engine events alone.

The same ``RunModel.apply`` consumes live events from the socket and the
history in ``events.jsonl``, so attaching to a run late draws exactly what a
console attached from the start would show.  The state knows nothing of the
views: it counts revisions of each ``Aspect`` of the run, and every view draws
again when an aspect it watches has moved on since it last drew.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from spu_engine.core.collapse import collapse_note
from spu_engine.core.protocol import (
    EVENTS,
    AckEvent,
    CheckpointEvent,
    DisconnectedEvent,
    ErrorEvent,
    EvalEvent,
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
    UnitInfo,
    UnitsEvent,
    UnitStats,
    read_event,
)
from spu_engine.core.run_metrics import RunMetrics, describe_change
from spu_engine.core.run_states import ENDED

SMOOTHING = 0.9  # EMA factor of the smoothed train-loss curve
RATE_WINDOW = 20  # steps over which samples/s and the ETA are measured: recent speed, not the average since start
SYSTEM_HISTORY = 512  # system samples kept for the plots (a long run's oldest go)
UNIT_HISTORY = 64  # statistics events the freeze advisor reads its trends from


class Aspect(Enum):
    """A part of what the console knows, revised as events arrive."""

    RUN = "run"  # name, model, state, what the engine waits for
    PROGRESS = "progress"  # step, speed, training loss
    EVALS = "evals"
    UNITS = "units"  # the model's units and tensors, what trains, their statistics
    POLICY = "policy"  # the policy in force and the steps it changed at
    SYSTEM = "system"  # GPU, CPU, RAM and throughput, as the engine samples them
    LOG = "log"
    METRICS = "metrics"  # any numeric field of any event, as named series (the metric filter plots them)


@dataclass
class LogLine:
    step: int
    kind: str  # policy | eval | state | checkpoint | export | error | log | ui
    text: str
    error: bool = False


@dataclass
class RunModel:
    run: str = "?"
    run_dir: str = ""
    model: str = "?"
    state: str = "connecting"
    step: int = 0
    total_steps: int = 0
    samples_per_s: float = 0.0
    seconds_per_step: float | None = None  # training time a step, over the recent window of steps
    metric: str = "accuracy"
    units: list[UnitInfo] = field(default_factory=list)
    unit_trainable: dict[str, float] = field(default_factory=dict)
    tensor_trainable: dict[str, bool] = field(default_factory=dict)
    unit_stats: dict[str, UnitStats] = field(default_factory=dict)
    unit_history: deque[dict[str, tuple[float, float]]] = field(
        default_factory=lambda: deque(maxlen=UNIT_HISTORY)
    )  # unit -> (grad norm, update ratio)
    tensor_sparsity: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # AdaLoRA: adapted module -> its rank now
    policy: dict[str, Any] = field(default_factory=dict)
    checkpoint_step: int | None = None  # the newest checkpoint the engine wrote while this console watched
    scheduled: list[dict[str, Any]] = field(
        default_factory=list
    )  # pending timeline entries and triggers (with ``fired``)
    loss_steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    loss_smooth: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_metric: list[float] = field(default_factory=list)
    change_steps: list[int] = field(default_factory=list)
    imp_rounds: list[ImpRoundEvent] = field(default_factory=list)  # one per IMP round that ended, in order
    system: deque[SystemEvent] = field(default_factory=lambda: deque(maxlen=SYSTEM_HISTORY))  # newest last
    log: list[LogLine] = field(default_factory=list)
    last_t: float = 0.0
    unreadable: int = 0  # events skipped because this console cannot read their shape
    waiting: str = ""  # what the engine is busy with before its first step (tokenizing, loading, the first step)
    waiting_since: float = 0.0  # wall time (an event's ``t``) when that began
    compiled: bool = False  # --compile: the first step compiles the model
    metrics: RunMetrics = field(default_factory=RunMetrics)
    revisions: Counter[Aspect] = field(default_factory=Counter)  # per aspect: how many events have changed it
    _recent: deque[tuple[float, int, int]] = field(
        default_factory=lambda: deque(maxlen=RATE_WINDOW)
    )  # (training clock, step, samples)
    _train_clock: float = 0.0  # seconds of training steps seen: the sum of the steps' own ``step_time``

    @property
    def collapsed(self) -> str | None:
        """The newest evaluation's collapse note: its answers were (nearly) all one class."""
        return collapse_note(self.metrics.last_eval)

    @property
    def eta_s(self) -> float | None:
        if self.seconds_per_step is None or self.state != "training":
            return None
        return max(0, self.total_steps - self.step) * self.seconds_per_step

    def apply(self, data: dict[str, Any]) -> None:
        """Take one event (as read from the socket or events.jsonl) into account."""
        if self.metrics.add(data):  # every kind, those this console has no model of too
            self.revisions[Aspect.METRICS] += 1
        ev = read_event(data)
        if ev is None:
            if isinstance(data, dict) and data.get("type") in EVENTS:
                self.unreadable += 1
                self.say(self.step, "ui", f"skipped a {data['type']} event this console cannot read", error=True)
            return
        self.last_t = max(self.last_t, ev.t)
        self.revisions.update(getattr(self, f"_on_{ev.type}")(ev))

    def say(self, step: int, kind: str, text: str, error: bool = False) -> None:
        """A line in the log (the engine's events, and the console's own messages)."""
        self.log.append(LogLine(step, kind, text, error))
        self.revisions[Aspect.LOG] += 1

    def stamp(self, aspects: tuple[Aspect, ...]) -> tuple[int, ...]:
        """The revisions of ``aspects``: a view that drew at this stamp is up to date while it stays the same."""
        return tuple(self.revisions[a] for a in aspects)

    def detach(self, reason: str) -> None:
        """The console cannot reach the engine (``reason`` says why)."""
        self.state = "detached"
        self.revisions[Aspect.RUN] += 1
        self.say(self.step, "error", reason, error=True)

    def _on_hello(self, ev: HelloEvent) -> set[Aspect]:
        self.run = ev.run or self.run
        self.run_dir = ev.run_dir or self.run_dir
        self.model = _short_model(str(ev.config.get("model", self.model)))
        self.state = ev.state
        self.step = ev.step
        self.total_steps = ev.total_steps or int(ev.config.get("steps", self.total_steps) or 0)
        self.metric = ev.metric or self.metric
        self.compiled = bool(ev.config.get("compile", self.compiled))
        if self.waiting.startswith("the first step"):  # the state came first (a replayed history)
            self._wait(self._first_step(), self.waiting_since)
        if ev.units:
            self._take_units(ev.units)
        if ev.current is not None:
            self.policy = ev.current
        if ev.scheduled is not None:
            self.scheduled = ev.scheduled
        return {Aspect.RUN, Aspect.PROGRESS, Aspect.UNITS, Aspect.POLICY}

    def starting(self, now: float) -> None:
        """The console started the engine at wall time ``now``: said until the engine's own first event."""
        self._wait("starting the engine", now)

    def _wait(self, what: str, since: float) -> None:
        """Now waiting for ``what``, since wall time ``since`` (the same wait said again keeps its start)."""
        if what != self.waiting or not self.waiting_since:
            self.waiting_since = since
        self.waiting = what

    def _first_step(self) -> str:
        if self.compiled:
            return "the first step: compiling the model (torch.compile; minutes on a CPU) and warming up"
        return "the first step: allocating memory and warming up (slower than the rest)"

    def _take_units(self, units: list[UnitInfo]) -> None:
        """The model's units and tensors (new ones appear, removed ones go), with their trainable flags."""
        self.units = units
        for u in units:
            for p in u.params:
                self.tensor_trainable[p.name] = p.trainable
        self._unit_fractions_from_tensors()

    def _on_state(self, ev: StateEvent) -> set[Aspect]:
        self.state = ev.state
        self.step = ev.step or self.step
        if ev.state == "loading":
            self._wait(ev.message, ev.t)
            if ev.phase is not None:  # a startup phase: the header says it, the log would only fill up
                return {Aspect.RUN}
        elif ev.state == "training" and not self.loss_steps:
            self._wait(self._first_step(), ev.t)
        else:
            self.waiting = ""
        self.say(
            self.step, "state", f"{self.state}{': ' + ev.message if ev.message else ''}", error=self.state == "error"
        )
        return {Aspect.RUN}

    def _on_step(self, ev: StepEvent) -> set[Aspect]:
        if self.loss_steps and ev.step <= self.loss_steps[-1]:
            return set()
        touched = {Aspect.PROGRESS}
        if self.waiting or self.state in ("loading", "connecting"):
            touched.add(Aspect.RUN)  # the first step ends the wait, and the state says training
        self.step = ev.step
        self.waiting = ""
        self._time_step(ev)
        loss = ev.loss
        if loss is not None and math.isfinite(loss):
            self.loss_steps.append(self.step)
            self.loss.append(loss)
            prev = self.loss_smooth[-1] if self.loss_smooth else loss
            self.loss_smooth.append(SMOOTHING * prev + (1 - SMOOTHING) * loss)
        if self.state in ("loading", "connecting"):
            self.state = "training"
        pruning = (ev.model_extra or {}).get("pruning")
        if isinstance(pruning, dict) and isinstance(pruning.get("units"), dict):  # masks changed at this step
            for unit, sparsity in pruning["units"].items():
                if isinstance(sparsity, (int, float)):
                    stats = self.unit_stats.setdefault(unit, UnitStats())
                    stats.sparsity = float(sparsity)
            touched.add(Aspect.UNITS)
        return touched

    def _time_step(self, ev: StepEvent) -> None:
        """Samples/s and seconds a step over the recent window, on the training clock: the sum of the steps' own
        times, so pauses, evaluations, checkpoints and startup never count (engines that send no ``step_time``:
        the wall clock)."""
        if ev.step_time is not None:
            self._train_clock += ev.step_time
        clock = self._train_clock if ev.step_time is not None else ev.t
        self._recent.append((clock, ev.step, ev.samples or 0))
        first_clock, first_step, first_samples = self._recent[0]
        if clock > first_clock and ev.step > first_step:
            self.seconds_per_step = (clock - first_clock) / (ev.step - first_step)
            if ev.samples is not None and ev.samples > first_samples:
                self.samples_per_s = (ev.samples - first_samples) / (clock - first_clock)
        elif ev.samples_per_s is not None:
            self.samples_per_s = ev.samples_per_s

    def _on_system(self, ev: SystemEvent) -> set[Aspect]:
        self.system.append(ev)
        return {Aspect.SYSTEM}

    def _on_units(self, ev: UnitsEvent) -> set[Aspect]:
        self.unit_stats = ev.units
        self.unit_history.append({name: (s.grad_norm, s.update_ratio) for name, s in ev.units.items()})
        for name, stats in ev.units.items():
            self.unit_trainable[name] = stats.trainable
        for name, tensor in ev.tensors.items():
            self.tensor_trainable[name] = tensor.trainable
            self.tensor_sparsity[name] = tensor.sparsity
        return {Aspect.UNITS}

    def _on_eval(self, ev: EvalEvent) -> set[Aspect]:
        metrics = {
            k: v for k, v in (ev.model_extra or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.eval_steps.append(ev.step)
        self.eval_loss.append(ev.eval_loss if ev.eval_loss is not None else math.nan)
        self.eval_metric.append(float(metrics.get(self.metric, math.nan)))
        shown = {"eval_loss": ev.eval_loss, **metrics} if ev.eval_loss is not None else metrics
        self.say(ev.step, "eval", ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        if (note := collapse_note(ev.model_extra or {})) is not None:
            self.say(ev.step, "eval", note, error=True)
        return {Aspect.EVALS}

    def _on_prune(self, ev: PruneEvent) -> set[Aspect]:
        self.say(
            ev.step,
            "policy",
            f"{ev.method} round {ev.round}/{ev.rounds}: sparsity {ev.sparsity:.1%}, survivors reset ({ev.reset})",
        )
        return set()

    def _on_imp_round(self, ev: ImpRoundEvent) -> set[Aspect]:
        self.imp_rounds.append(ev)
        score = ev.eval.get(self.metric, ev.eval.get("eval_loss"))
        shown = f", {self.metric if self.metric in ev.eval else 'eval loss'} {score:.4g}" if score is not None else ""
        loss = f", train loss {ev.train_loss:.4g}" if ev.train_loss is not None else ""
        self.say(
            ev.step,
            "eval",
            f"IMP round {ev.round}/{ev.rounds} ended: sparsity {ev.sparsity:.1%}{loss}{shown}, {ev.seconds:.0f} s",
        )
        return {Aspect.UNITS}

    def _on_policy(self, ev: PolicyEvent) -> set[Aspect]:
        self.policy = ev.policy or self.policy
        if ev.units is not None:
            self._take_units(ev.units)
        self.unit_trainable.update(ev.trainable_by_unit)
        if ev.frozen_tensors is not None:
            frozen = set(ev.frozen_tensors)
            for u in self.units:
                for p in u.params:
                    self.tensor_trainable[p.name] = p.name not in frozen
        self.change_steps.append(ev.step)
        self.say(ev.step, "policy", f"{describe_change(ev.change)} ({ev.source}); trainable {ev.trainable:,}")
        return {Aspect.UNITS, Aspect.POLICY}

    def _on_ranks(self, ev: RanksEvent) -> set[Aspect]:
        self.ranks = dict(ev.ranks)
        low, high = (min(ev.ranks.values()), max(ev.ranks.values())) if ev.ranks else (0, 0)
        self.say(
            ev.step, "policy", f"adalora ranks: budget {ev.budget} over {len(ev.ranks)} modules, each {low}-{high}"
        )
        return {Aspect.UNITS}

    def _on_scheduled(self, ev: ScheduledEvent) -> set[Aspect]:
        self.scheduled = ev.scheduled
        return {Aspect.POLICY}

    def _on_received(self, ev: ReceivedEvent) -> set[Aspect]:
        return set()  # an answer for the console's command tracker alone

    def _on_preview(self, ev: PreviewEvent) -> set[Aspect]:
        return set()  # an answer for the controls alone (the screen hands it over)

    def _on_ack(self, ev: AckEvent) -> set[Aspect]:
        if ev.ok and ev.cmd in ("export", "checkpoint") and ev.message:
            self.say(ev.step or self.step, ev.cmd, ev.message)
        return set()

    def _on_error(self, ev: ErrorEvent) -> set[Aspect]:
        self.say(ev.step or self.step, "error", ev.message, error=True)
        return set()

    def _on_checkpoint(self, ev: CheckpointEvent) -> set[Aspect]:
        self.checkpoint_step = ev.step
        self.say(ev.step, "checkpoint", ev.path)
        return set()

    def _on_resumed(self, ev: ResumedEvent) -> set[Aspect]:
        self._recent.clear()  # the resumed engine's speed, from the resumed step on
        self.say(ev.step, "state", ev.message or f"resumed at step {ev.step}")
        return set()

    def _on_log(self, ev: LogEvent) -> set[Aspect]:
        self.say(ev.step or self.step, "log", ev.message, error=ev.level in ("error", "warning"))
        return set()

    def _on_disconnected(self, ev: DisconnectedEvent) -> set[Aspect]:
        if self.state not in ENDED:
            self.state = "detached"
            self.say(self.step, "state", "engine connection lost: " + ev.message, error=True)
            return {Aspect.RUN}
        return set()

    def _unit_fractions_from_tensors(self) -> None:
        for u in self.units:
            known = [p for p in u.params if p.name in self.tensor_trainable]
            if known and u.numel:
                self.unit_trainable[u.name] = sum(p.numel for p in known if self.tensor_trainable[p.name]) / u.numel

    def unit_of(self, tensor: str) -> str | None:
        for u in self.units:
            if any(p.name == tensor for p in u.params):
                return u.name
        return None


def _short_model(model: str) -> str:
    path = Path(model.rstrip("/"))
    return path.parent.name if path.name == "model" and path.parent.name else path.name or model
