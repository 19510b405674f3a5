"""The training loop, controllable live at step boundaries.

Commands from any thread go into an inbox (``commands``); the loop takes them
only at a step boundary (``lifecycle.RunControl.boundary``, between two
optimizer steps), so a change is in force from the next optimizer step on, and
every rank of a multi-process run takes the same commands at the same step.
Every applied change is appended to the policy timeline with its step, which
makes the run replayable from its policy file; so is every trigger's change
when it fires (at an epoch, or at an evaluation that meets its condition).

The engine is assembled from one concept a file: ``training`` (the step and
evaluation arithmetic, and what a failed batch does), ``lifecycle`` (pause,
stop, waiting for writes), ``runtime`` (the policy applied to the model, shared
with the own-loop controller), ``commands`` (the command table), ``faults``,
``unit_stats``, ``event_log`` and ``checkpoint``.  Here: setup, events, the
policy record, checkpoints and the loop itself.
"""

from __future__ import annotations

import copy
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .batching import BatchStream
from .commands import Commands
from .config import EngineConfig
from .distributed import Distributed
from .event_log import EventLog
from .faults import UnwrittenState
from .lifecycle import RunControl, RunState, Stop
from .methods import method_classes
from .model import count_params, load_model, load_tokenizer, name_classes
from .model_source import ModelLoadError, resolve_model_name
from .policy import Change, Policy, PolicyError, TimelineEntry, undo_change
from .protocol import encode, event
from .runs import CHECKPOINTS, CONFIG, EVENTS, POLICY, write_config, write_policy
from .tasks import Task, TaskOptions, get_task
from .runtime import PolicyRuntime, TimelineRefused
from .selection import check_policy_against_model
from .system_metrics import SystemSampler
from .trackers import Trackers, unavailable
from .training import StepLoop, build_optimizer, pick_device, regroup
from .unit_stats import describe_units, trainable_by_unit


class Engine(StepLoop, RunControl, PolicyRuntime):
    """One model, one task, one policy; ``run()`` trains until the step budget or a stop."""

    def __init__(
        self,
        config: EngineConfig,
        policy: Policy | None = None,
        run_dir: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer=None,
        task: Task | None = None,
        sinks: list[Callable[[bytes, dict], None]] | None = None,
        dist: Distributed | None = None,
    ) -> None:
        self.config = config
        self.dist = dist  # set for multi-process runs: rank 0 decides, every rank applies
        reports = dist is None or dist.is_main  # rank 0 alone samples the machine and feeds trackers
        missing = unavailable(config.report_to) if reports and run_dir else None
        if missing:
            raise ValueError(missing)
        self.run_dir = Path(run_dir) if run_dir else None
        self.sinks: list[Callable[[bytes, dict], None]] = list(sinks or [])
        self.state = RunState.LOADING
        self.stop: Stop | None = None
        self._stop_signal: str | None = None  # set by a signal handler; acted on at the next boundary
        self._write_pause = False  # paused because run state could not be written: resume means retry
        self.unwritten = UnwrittenState()
        self._retry_at = 0.0
        self.step = 0
        self.samples_seen = 0
        self.evaluated_at: int | None = None
        self.collapsed = False  # the last evaluation gave (nearly) every example one answer
        self._nonfinite_streak = 0
        self._saved_step: int | None = None  # step of the last checkpoint written by this process
        self._saved_path: Path | None = None
        self._step_time_ema: float | None = None
        self.event_log: EventLog | None = None
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.event_log = EventLog(self.run_dir / EVENTS)
        self._setup_device()
        self.system = SystemSampler([self.device], config.system_every, dist.world_size if dist else 1) if reports else None
        self.tokenizer = tokenizer
        self.task = task or self._setup_task()
        self._setup_model(model)
        self.stream = BatchStream(len(self.task.train), seed=config.seed)
        # an epoch in optimizer steps, as the HF Trainer counts it (selective backprop draws more samples a step)
        self.steps_per_epoch = max(1, len(self.task.train) // (config.batch_size * (dist.world_size if dist else 1)))
        self.methods = [m(self) for m in method_classes()]
        self.optimizer = build_optimizer(self.model, config)
        self.warm_from: dict[str, int] = {}
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self._setup_policy(policy or Policy())
        self.commands = Commands(self)
        self.trackers = Trackers(config.report_to, self.run_dir) if reports and self.run_dir and config.report_to else None
        if self.trackers is not None:
            self.sinks.append(self.trackers)

    # ------------------------------------------------------------------ setup

    def _setup_device(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        self.device, self.amp_dtype = pick_device(self.config, self.dist)

    def _setup_task(self) -> Task:
        config = self.config
        self.set_state(RunState.LOADING, f"reading and tokenizing {config.data}")
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(config.model)
        task = get_task(config.task).build(config.data, self.tokenizer, TaskOptions.of(config))
        for note in task.notes:
            self.log(note, "warning")
        return task

    def _setup_model(self, model: torch.nn.Module | None) -> None:
        self._given_model: torch.nn.Module | None = None  # a model handed in (tests, benchmarks): its step-0 copy
        if model is None:
            self.set_state(RunState.LOADING, f"loading the model {self.config.model}")
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.config.model)
            model = self._load_model(self.config.model)
        else:
            self._given_model = copy.deepcopy(model).cpu()
        self.task.check_fits(model)
        name_classes(model, getattr(self.task, "label_names", None))
        self.model = model.to(self.device)
        self.model.train()
        self.refresh_parameters()
        self.loaded_names = list(self.param_names)

    def _load_model(self, source: str) -> torch.nn.Module:
        """``source`` with the task's head, a new head drawn from the run's seed alone, so loading again gives the
        same model (distillation's ``initial`` teacher)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            return load_model(source, type(self.task).model_kind, num_labels=self.task.num_labels, tokenizer=self.tokenizer)

    def initial_model(self) -> torch.nn.Module:
        """The model as this run loaded it at step 0, a new copy."""
        if self._given_model is not None:
            return copy.deepcopy(self._given_model)
        try:
            return self._load_model(self.config.model)
        except ModelLoadError as exc:
            raise PolicyError(str(exc)) from None

    def load_teacher(self, source: str) -> torch.nn.Module:
        try:
            return load_model(source, type(self.task).model_kind, num_labels=None, tokenizer=self.tokenizer, trained=True)
        except ModelLoadError as exc:
            raise PolicyError(str(exc)) from None

    def _setup_policy(self, policy: Policy) -> None:
        check_policy_against_model(policy, self.model, self.units, self.names_under)
        self.initial_policy = policy.state()
        self.current = policy.state()
        self.recorded: list[TimelineEntry] = []
        self.undoable: list[Policy] = []  # the sections before each client change, newest last (``undo``)
        self.split_timeline(policy)
        for trigger in self.triggers:
            self._check_trigger(trigger)
        if not self.config.eval_every and any(t.when is not None for t in self.triggers):
            self.log("when-triggers are checked at the evaluations every eval_every steps; with eval_every 0 only the last one, "
                     "after the last step, where a change acts on nothing", "warning")
        self._configure_methods(self.current)
        self._apply_trainable()
        self.regroup()

    def _check_trigger(self, trigger: TimelineEntry) -> None:
        """A when-trigger must watch a number this task's evaluation gives."""
        fields = self.task.eval_fields
        if trigger.when is not None and trigger.when.metric not in fields:
            raise PolicyError(
                f"timeline: the trigger {trigger.moment()}: {trigger.when.metric!r} is not a field of the {self.task.name} task's "
                f"evaluation (it gives {', '.join(fields)})"
            )

    # ------------------------------------------------------------------ events

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = event(type_, **fields)
        line = encode(ev)
        if self.event_log is not None:
            self.event_log.add(line)
            if EVENTS not in self.unwritten:  # while it fails, retries come from the paused loop, not every event
                self.unwritten.write(EVENTS, self.event_log.flush)
        for sink in self.sinks:
            sink(line, ev)
        return ev

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message, step=self.step)

    def hello(self) -> dict[str, Any]:
        """Snapshot a client needs to draw everything from scratch."""
        return event(
            "hello",
            run=self.run_dir.name if self.run_dir else None,
            run_dir=str(self.run_dir) if self.run_dir else None,
            pid=os.getpid(),
            config=self.config.model_dump(),
            model_path=resolve_model_name(self.config.model),
            task=self.task.name,
            metric=self.task.metric,
            units=describe_units(self.units, self.params),
            policy=self.replayable_policy().model_dump(mode="json", exclude_none=True),
            current=self.current.model_dump(mode="json", exclude_none=True),
            scheduled=self.scheduled(),
            state=self.state.value,
            step=self.step,
            total_steps=self.config.steps,
            trainable=self.trainable_count(),
            total_params=count_params(self.model),
            device=str(self.device),
        )

    def set_state(self, state: RunState, message: str = "") -> None:
        self.state = state
        self.emit("state", state=state.value, step=self.step, message=message)

    @property
    def exit_code(self) -> int:
        """The process's exit code once ``run`` returned: 1 when a fault stopped the run."""
        return 1 if self.stop is not None and self.stop.fault else 0

    # ------------------------------------------------------------------ policy

    def replayable_policy(self) -> Policy:
        """Run settings + state at step 0 + every change applied so far + changes still scheduled + the triggers, each
        with the steps it fired at (its firings are among the changes applied, so a replay does not decide them again),
        and each method that decides by itself marked as decided up to its last decision (``Method.exported``)."""
        timeline = [*self.recorded, *self.pending, *self.triggers]
        initial = self.initial_policy
        for m in self.methods:
            initial = m.exported(initial)
        return initial.model_copy(update={"run": self.config.run_settings(), "timeline": timeline})

    def scheduled(self) -> list[dict[str, Any]]:
        """What is still to come, as the console lists it: the pending step entries and every trigger (fired ones too)."""
        return [e.model_dump(mode="json", exclude_none=True, exclude_defaults=True) for e in [*self.pending, *self.triggers]]

    def schedule_changed(self) -> None:
        self._save_policy()
        self.emit("scheduled", step=self.step, scheduled=self.scheduled())

    def add_scheduled(self, entry: TimelineEntry) -> str:
        """A timeline entry or trigger from a console.  A when-trigger is checked from the next evaluation on (its
        ``after_step`` is now), so a replay of the export checks it from the same point."""
        if entry.step is not None and entry.step < self.step:
            raise PolicyError(f"add: step {entry.step} has passed (the run is at step {self.step}); make the change now instead")
        if entry.at is not None and self.epoch_start(entry.at.epoch or 0) < self.step:
            raise PolicyError(
                f"add: epoch {entry.at.epoch} began at step {self.epoch_start(entry.at.epoch or 0)} (the run is at step {self.step}, "
                f"{self.steps_per_epoch} steps an epoch); make the change now instead"
            )
        if entry.when is not None:
            entry = entry.model_copy(update={"after_step": max(entry.after_step, self.step), "fired": []})
            self._check_trigger(entry)
        self.current.apply(entry)  # PolicyError naming the key, for a change that makes no valid policy
        check_policy_against_model(self.current.model_copy(update={"timeline": [entry]}), self.model, self.units, self.names_under)
        if entry.is_trigger:
            self.triggers.append(entry)
        else:
            self.pending = sorted([*self.pending, entry], key=lambda e: e.step or 0)
        try:
            self.apply_due(self.step)  # an entry due now applies at this boundary, as it would in a replay
        except TimelineRefused:
            (self.triggers if entry.is_trigger else self.pending).remove(entry)
            raise
        finally:
            self.schedule_changed()
        return f"scheduled: {entry.moment()}"

    def remove_scheduled(self, entry: TimelineEntry) -> str:
        """Take a pending entry or a trigger out (matched by what it does and when; its firings so far stay recorded)."""
        key = entry.model_dump(exclude={"fired", "after_step"})
        for kept in (self.pending, self.triggers):
            for e in kept:
                if e.model_dump(exclude={"fired", "after_step"}) == key:
                    kept.remove(e)
                    self.schedule_changed()
                    return f"removed: {e.moment()}"
        raise PolicyError(f"remove: no scheduled {entry.moment()} with that change (it may have applied or been removed already)")

    def _configure_methods(self, policy: Policy) -> None:
        for m in self.configure_order(policy):
            m.configure(policy, self.step)

    def _take_change(self, change: Change) -> None:
        """As the runtime's, and after it: a tensor that starts training after step 0 ramps in (``lr.warm_in``), and
        the optimizer groups follow the multipliers (also after a refusal, which may have re-added a method's group)."""
        before = {n for n, p in self.params.items() if p.requires_grad}
        try:
            super()._take_change(change)
            if self.step > 0 and self.current.lr.warm_in:
                self.warm_from.update({n: self.step for n, p in self.params.items() if p.requires_grad and n not in before})
        finally:
            self.regroup()

    def regroup(self) -> None:
        """One optimizer group per method group and (lr multiplier, warm-in start); AdamW state stays with each tensor."""
        scales = self.lr_multipliers()
        key_of = {id(p): (scales.get(n, 1.0), self.warm_from.get(n)) for n, p in self.params.items()}
        regroup(self.optimizer, key_of, {id(p): i for i, p in enumerate(self.params.values())})

    def apply_change(self, change: Change, source: str) -> None:
        """Apply a change at the current boundary; raises PolicyError and leaves everything as it was."""
        before, names = self.current, self.param_names
        self._take_change(change)
        if self.current == before:  # e.g. a field set back to the value in force: nothing to record or replay
            return
        if source == "client":
            self.undoable.append(before)
        self.recorded.append(TimelineEntry(step=self.step, **change.model_dump()))
        self._save_policy()
        self.emit(
            "policy",
            step=self.step,
            source=source,
            change=change.model_dump(mode="json", exclude_none=True),
            policy=self.current.model_dump(mode="json", exclude_none=True),
            trainable=self.trainable_count(),
            trainable_by_unit=trainable_by_unit(self.units, self.params),
            frozen_tensors=[n for n, p in self.params.items() if not p.requires_grad],
            units=describe_units(self.units, self.params) if self.param_names != names else None,  # a method added or removed tensors
        )
        if self.trainable_count() == 0:
            self.log("no parameter trains now: the freeze rules and the methods together leave none; steps change nothing", "warning")

    def undo(self) -> str:
        """Put back the sections as they were before the last client change, as a change of its own (recorded, so replay stays exact)."""
        if not self.undoable:
            raise PolicyError("undo: nothing to undo (no change from a console since the engine started)")
        restore = undo_change(self.undoable[-1], self.current)
        self.apply_change(restore, source="undo")  # refused (e.g. LoRA has trained): nothing changes
        self.undoable.pop()
        return f"restored {', '.join(restore.set) or 'nothing (already as it was)'} as before the last change"

    def _save_policy(self) -> None:
        if self.run_dir:
            self.unwritten.write(POLICY, lambda: write_policy(self.run_dir, self.replayable_policy()))

    def _save_config(self) -> None:
        if self.run_dir:
            self.unwritten.write(CONFIG, lambda: write_config(self.run_dir, self.config))

    # ------------------------------------------------------------------ checkpoints

    def save_or_pause(self) -> None:
        """A checkpoint that cannot be written (disk full) pauses the run instead of ending it, state in memory,
        until a retry writes it (automatic, `s` or resume) or the run is stopped."""
        if not self.unwritten.write("checkpoint", self.save_checkpoint) and self.dist is None:
            self.boundary()

    def save_checkpoint(self) -> Path | None:
        if not self.run_dir:
            return None
        state = {
            "policy": self.initial_policy.model_copy(update={"timeline": self.recorded}).model_dump(mode="json", exclude_none=True),
            "pending": [e.model_dump(mode="json", exclude_none=True) for e in self.pending],
            "triggers": [e.model_dump(mode="json", exclude_none=True) for e in self.triggers],
            "metric_range": self.metric_range,
            "stream": self.stream.state_dict(),
            "samples_seen": self.samples_seen,
            "config": self.config.model_dump(),
            "label_names": getattr(self.task, "label_names", None),  # the label of each class id: `spu eval` maps new data by it
            "methods": {type(m).__name__: m.state_dict() for m in self.methods},
            "warm_from": self.warm_from,
            "rng": ckpt.rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        path = ckpt.save_checkpoint(
            self.run_dir / CHECKPOINTS, self.step, self.model, self.optimizer, state,
            keep=self.config.keep_checkpoints, method_tensors=ckpt.method_tensors(self.methods),
        )
        self._saved_step, self._saved_path = self.step, path
        self.emit("checkpoint", step=self.step, path=str(path))
        return path

    def resume_from(self, path: Path, fresh_optimizer: bool = False) -> None:
        """Policy (with timeline), method state, weights, optimizer, data position and RNG from a checkpoint.

        ``fresh_optimizer``: the user accepts fresh optimizer state when the checkpoint's is missing or unusable
        (the weights must verify all the same); without it such a checkpoint is a CheckpointError naming the flag.
        """
        state = ckpt.read_state(path, ignore=(ckpt.OPTIMIZER,) if fresh_optimizer else ())
        policy = Policy.model_validate(state["policy"])
        self.initial_policy = policy.state()
        self.recorded = list(policy.timeline)
        self.pending = [TimelineEntry.model_validate(e) for e in state["pending"]]
        self.triggers = [TimelineEntry.model_validate(e) for e in state.get("triggers", [])]  # with the steps they fired at
        self.metric_range = state.get("metric_range", {})
        self.step = state["step"]
        self.current = policy.at_step(self.step)
        self._configure_methods(self.current)  # before the weights: a method may add tensors (adapters, LoRA)
        for m in self.methods:
            m.load_state_dict(state.get("methods", {}).get(type(m).__name__, {}))
        self._apply_trainable()
        self.warm_from = dict(state.get("warm_from", {}))
        self.regroup()  # the groups the checkpoint's optimizer state was saved with
        ckpt.load_weights(path, self.model)
        problem = ckpt.load_optimizer_or_fresh(path, self.optimizer, fresh_optimizer, self.run_dir or path.parent.parent)
        if problem:
            self.log(f"{path.name}: optimizer state not used ({problem}); AdamW starts afresh (--fresh-optimizer)", "warning")
        ckpt.restore_method_tensors(self.methods, ckpt.load_method_tensors(path))
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        self.samples_seen = state.get("samples_seen", 0)
        ckpt.restore_rng(state["rng"])
        # readers of events.jsonl drop the events after this step that the lost process wrote (runs.read_history)
        self.emit("resumed", step=self.step, checkpoint=str(path), message=f"resumed from {path.name} at step {self.step}")

    # ------------------------------------------------------------------ run

    def run(self) -> str:
        """Train to ``config.steps`` or until stopped; returns the final state."""
        self._save_policy()
        self._save_config()
        self.set_state(RunState.TRAINING, f"trainable {self.trainable_count():,} of {count_params(self.model):,}")
        # the full snapshot for clients that connected while loading, and for events.jsonl (history of a dead run)
        self.emit("hello", **{k: v for k, v in self.hello().items() if k not in ("type", "t")})
        try:
            while self.step < self.config.steps:
                self.boundary()
                if self.stop is not None:
                    break
                taken = self.step
                fields = self.survive_oom(self.train_step, "training step")
                self._after_step(fields if self.step > taken else None)
                if self.step == taken:
                    continue  # batch skipped (non-finite) or out of memory: nothing new to evaluate or save
                if self.eval_due():
                    self._evaluated(self.survive_oom(self.evaluate, "evaluation"))
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save_or_pause()
            if self.system is not None and self.system.has_steps:  # the steps since the last sample, even in a short run
                self.emit("system", step=self.step, **self.system.sample())
            if self.stop is None:
                if self.evaluated_at != self.step:
                    self._evaluated(self.survive_oom(self.evaluate, "evaluation"))
                    self._saved_step = None  # evaluation hooks may have changed method state
                if self._saved_step != self.step:
                    self.save_or_pause()
                self._save_policy()
                if self.unwritten:
                    self.boundary()  # the last writes wait for space like any other
            if self.stop is not None:
                self.set_state(RunState.STOPPED, self.stop.reason or f"stopped at step {self.step}")
                return RunState.STOPPED.value
            self.set_state(RunState.FINISHED, f"{self.step} steps")
            return RunState.FINISHED.value
        finally:
            if self.event_log is not None and self.event_log.unwritten:
                self.unwritten.write(EVENTS, self.event_log.flush)

    def _after_step(self, fields: dict[str, Any] | None) -> None:
        """After a step (``fields`` None: none was taken): the system event when due, and what trackers had to say."""
        if self.system is not None:
            self.system.stepped(fields["step_time"] if fields else None)
            if self.system.due():
                self.emit("system", step=self.step, **self.system.sample())
        if self.trackers is not None:
            for message in self.trackers.problems():
                self.log(message, "warning")

    def _evaluated(self, metrics: dict[str, float] | None) -> None:
        """An evaluation the run schedules (every ``eval_every`` steps, and the last): the when-triggers decide on it.
        A replay repeats these; `r`'s evaluations do not count, so they cannot make a replay diverge."""
        if self.dist is not None:  # every rank decides on rank 0's numbers, so all fire at the same step
            metrics = self.dist.broadcast(metrics)
        if not metrics:
            return
        try:
            self.on_evaluation(self.step, metrics)
        except TimelineRefused as exc:
            self._timeline_failed(exc.entry, exc)

    def close(self) -> None:
        if self.trackers is not None:  # what they still hold is written first; a failure there is a warning like any other
            self.sinks.remove(self.trackers)
            for message in self.trackers.close():
                self.log(message, "warning")
            self.trackers = None
        if self.event_log is not None:
            left = self.event_log.close()
            if left:
                print(f"spu-engine: {left} last events could not be written to {EVENTS}", file=sys.stderr, flush=True)
            self.event_log = None
