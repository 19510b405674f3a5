"""The training loop, controllable live at step boundaries.

Commands from any thread go into an inbox (``commands``); the loop takes them
only at a step boundary (``lifecycle.RunControl.boundary``, between two
optimizer steps), so a change is in force from the next optimizer step on, and
every rank of a multi-process run takes the same commands at the same step.
Every applied change is appended to the policy timeline with its step, which
makes the run replayable from its policy file; so is every trigger's change
when it fires (at an epoch, or at an evaluation that meets its condition).

``Engine`` composes one component a concept, each given what it uses:
``runtime.PolicyRuntime`` (the policy applied to the model; the methods' host,
shared in kind with the own-loop controller), ``policy_record.PolicyRecord``
(the policy as ``policy.yaml`` replays it), ``training.Trainer`` (the step and
evaluation arithmetic), ``lifecycle.RunControl`` (pause, stop, the boundary,
waiting for writes), ``commands.Commands``, ``lr_groups.LrGroups`` and
``emitter.Emitter``.  Here: setup, the wiring, checkpoints and the run's recipe.
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spu_engine.core.checkpoint_pooling import pooling_note
from spu_engine.core.config import EngineConfig
from spu_engine.core.model_source import ModelLoadError
from spu_engine.core.policy import Policy, PolicyError
from spu_engine.core.run_states import RunState
from spu_engine.core.runs import CHECKPOINTS, CONFIG, EVENTS, write_config
from spu_engine.core.trackers import Trackers, unavailable
from spu_engine.loop.batching import stream_for
from spu_engine.loop.change_rollback import ChangeRollback
from spu_engine.loop.checkpoint_cadence import CheckpointCadence
from spu_engine.loop.commands import Commands
from spu_engine.loop.compiled import compile_run
from spu_engine.loop.distributed import Distributed
from spu_engine.loop.emitter import Emitter
from spu_engine.loop.faults import UnwrittenState
from spu_engine.loop.forwarding import forwards
from spu_engine.loop.lifecycle import RunControl
from spu_engine.loop.lr_groups import LrGroups
from spu_engine.loop.optimizer import build_optimizer, pick_device
from spu_engine.loop.policy_record import PolicyRecord
from spu_engine.loop.rank_digest import watch_ranks
from spu_engine.loop.run_checkpoint import resume_run, save_run
from spu_engine.loop.sharding import shard_runtime
from spu_engine.loop.snapshot import hello_event
from spu_engine.loop.system_metrics import SystemSampler
from spu_engine.loop.trainer import Progress, Trainer
from spu_engine.model.loading import count_params, load_model, load_tokenizer, name_classes, pooled
from spu_engine.runtime.policy_runtime import PolicyRuntime, RuntimeHooks, TimelineRefused
from spu_engine.storage.event_log import EventLog
from spu_engine.tasks import Task, TaskOptions, get_task


# what the commands (commands.CommandHost), the server, tools, benchmarks and tests use of the engine, each
# attribute owned by one component
@forwards(
    runtime="model optimizer methods params units param_names current pending triggers metric_range steps_per_epoch "
    "apply_change apply_due preview trainable_count",
    record="recorded undoable replayable_policy scheduled add_scheduled remove_scheduled undo",
    trainer="step samples_seen collapsed task train_step evaluate per_sample_loss backward next_batch batch_of losses_of train_on "
    "survive_oom _say_if_collapsed _lr_factor _autocast",
    control="state stop set_state submit boundary pause resume request_stop request_stop_now write_checkpoint_now "
    "checkpoint_now write_retry_s",
    lr_groups="warm_from",
    rollback="change_out_of_memory",
    events="emit log event_log",
)
class Engine:
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
        reports = dist is None or dist.is_main  # rank 0 alone feeds trackers
        missing = unavailable(config.report_to) if reports and run_dir else None
        if missing:
            raise ValueError(missing)
        self.run_dir = Path(run_dir) if run_dir else None
        self.checkpoints = self.run_dir / CHECKPOINTS if self.run_dir else None  # a sharded run's other ranks: set
        self.sinks: list[Callable[[bytes, dict], None]] = list(sinks or [])
        self.unwritten = UnwrittenState()
        self.progress = Progress()
        self.saved: tuple[int, Path] | None = None  # the last checkpoint's step and folder; None once anything changed
        self.cadence = CheckpointCadence(config)  # when a checkpoint is due on its own
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        event_log = EventLog(self.run_dir / EVENTS) if self.run_dir else None
        self.events = Emitter(self.sinks, event_log, self.unwritten, self.progress.now)
        self._setup_device()
        self.system = SystemSampler(  # on every rank: each reads its own throughput and memory, rank 0 gathers them
            [self.device], config.system_every, dist.world_size if dist else 1, dist.rank if dist else 0
        )
        self.tokenizer = tokenizer
        task = task or self._setup_task()
        self.stream = stream_for(task, config.seed, config.batch_size * (dist.world_size if dist else 1))
        model = self._setup_model(model, task)
        self.loading("optimizer", "building the optimizer")
        self._setup_runtime(model, task)
        self._setup_control()
        self._setup_trainer(task)
        self._setup_policy(policy or Policy(), task)  # methods configure now: distillation's teacher needs the task
        self.compiled = compile_run(self) if config.compile else None  # --compile: in place, its compiles said
        self.trackers = (
            Trackers(config.report_to, self.run_dir) if reports and self.run_dir and config.report_to else None
        )
        if self.trackers is not None:
            self.sinks.append(self.trackers)

    # ------------------------------------------------------------------ setup

    def _setup_device(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        self.device, self.amp_dtype = pick_device(self.config, self.dist)

    def loading(self, phase: str, message: str) -> None:
        """A ``state`` event while loading, naming its ``phase`` (the run control, which owns the state from then on,
        comes later)."""
        self.events.emit("state", state=RunState.LOADING.value, step=self.progress.step, message=message, phase=phase)

    def _setup_task(self) -> Task:
        config = self.config
        self.loading("data", f"tokenizing {config.data}")
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(config.model)
        task = get_task(config.task).build(config.data, self.tokenizer, TaskOptions.of(config))
        for note in task.notes:
            self.events.log(note, "warning")
        return task

    def _setup_model(self, model: torch.nn.Module | None, task: Task) -> torch.nn.Module:
        self._given_model: torch.nn.Module | None = None  # a model handed in (tests, benchmarks): its step-0 copy
        if model is None:
            self.loading("model", f"loading the model {self.config.model}")
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.config.model)
            model = self._load_model(self.config.model, task)
        else:
            self._given_model = copy.deepcopy(pooled(model, self.config.pooling)).cpu()
        if self.config.pooling is not None:
            self.events.log(pooling_note(self.config.model, self.config.pooling))
        task.check_fits(model)
        name_classes(model, getattr(task, "label_names", None))
        model = model.to(self.device)
        model.train()
        return model

    def _setup_runtime(self, model: torch.nn.Module, task: Task) -> None:
        """The policy runtime on the model and a fresh optimizer; its hooks reach the record and the lr groups."""
        world = self.dist.world_size if self.dist else 1
        # an epoch in optimizer steps, as the HF Trainer counts it (selective backprop draws more samples a step)
        steps_per_epoch = max(1, len(task.train) // (self.config.batch_size * world))
        self.hooks = RuntimeHooks(initial_model=self.initial_model, load_teacher=self.load_teacher)
        self.runtime = PolicyRuntime(
            model,
            build_optimizer(model, self.config),
            self.config,
            reporter=self.events,
            clock=self.progress.now,
            steps_per_epoch=steps_per_epoch,
            hooks=self.hooks,
        )
        self.lr_groups = LrGroups(self.runtime, self.progress.now)
        self.hooks.taken = self.lr_groups.taken
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def _setup_policy(self, policy: Policy, task: Task) -> None:
        """The policy in force at step 0, checked against the model and the task, and the record that keeps it."""
        self.runtime.adopt(policy)
        self.record = PolicyRecord(
            self.runtime,
            policy,
            config=self.config,
            task=task,
            reporter=self.events,
            clock=self.progress.now,
            unwritten=self.unwritten,
            run_dir=self.run_dir,
        )
        self.record.check_triggers()
        self.record.check_machine(policy.machine)
        self.rollback = ChangeRollback(
            self.runtime, self.record, self.events, self.progress.now, self.device, multi_process=self.dist is not None
        )
        self.hooks.applied, self.hooks.scheduled = self.rollback.applied, self.record.schedule_changed
        if self.dist is not None:  # FSDP2, the timeline's tensors planned first; the ranks compared after each change
            shard_runtime(self.runtime, self.dist, self.config.sharding, self.amp_dtype, self.config.plan_peft)
            watch_ranks(self.runtime, self.dist, lambda problem: self.control.fault(problem, "ranks"))
        self.runtime.put_in_force()
        self.lr_groups.regroup()

    def _setup_control(self) -> None:
        self.commands = Commands(self)
        self.control = RunControl(
            self.events,
            self.progress.now,
            self.commands,
            self.unwritten,
            apply_due=self.runtime.apply_due,
            save_checkpoint=self.save_checkpoint,
            dist=self.dist,
            run_dir=self.run_dir,
        )

    def _setup_trainer(self, task: Task) -> None:
        self.trainer = Trainer(
            self.config,
            self.runtime,
            self.lr_groups,
            task,
            self.stream,
            progress=self.progress,
            reporter=self.events,
            control=self.control,
            device=self.device,
            amp_dtype=self.amp_dtype,
            scaler=self.scaler,
            dist=self.dist,
            system=self.system,
            run_dir=self.run_dir,
            rolled_back=lambda detail: self.rollback.rolled_back(detail),  # the rollback comes with the policy
        )
        self.events.settle = self.trainer.readout.settle

    def _load_model(self, source: str, task: Task) -> torch.nn.Module:
        """``source`` with the task's head, a new head drawn from the run's seed alone, so loading again gives the
        same model (distillation's ``initial`` teacher)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            kind, pooling = type(task).model_kind, self.config.pooling
            return load_model(source, kind, task.num_labels, self.tokenizer, task.label_names, pooling=pooling)

    def initial_model(self) -> torch.nn.Module:
        """The model as this run loaded it at step 0, a new copy."""
        if self._given_model is not None:
            return copy.deepcopy(self._given_model)
        try:
            return self._load_model(self.config.model, self.task)
        except ModelLoadError as exc:
            raise PolicyError(str(exc)) from None

    def load_teacher(self, source: str) -> torch.nn.Module:
        try:
            return load_model(
                source, type(self.task).model_kind, num_labels=None, tokenizer=self.tokenizer, trained=True
            )
        except ModelLoadError as exc:
            raise PolicyError(str(exc)) from None

    def hello(self) -> dict[str, Any]:
        """Snapshot a client needs to draw everything from scratch."""
        return hello_event(self)

    @property
    def exit_code(self) -> int:
        """The process's exit code once ``run`` returned: 1 when a fault stopped the run."""
        return 1 if self.stop is not None and self.stop.fault else 0

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        self.events.settle()  # the held step's loss reaches the methods first (an IMP round's tally)
        return save_run(self) if self.checkpoints else None

    def resume_from(self, path: Path, fresh_optimizer: bool = False) -> None:
        """Policy (with timeline), method state, weights, optimizer, data position and RNG from a checkpoint;
        ``fresh_optimizer``: the user accepts fresh optimizer state when the checkpoint's is missing or unusable."""
        resume_run(self, path, fresh_optimizer)

    # ------------------------------------------------------------------ run

    def run(self) -> str:
        """Train to ``config.steps`` or until stopped; returns the final state."""
        self._begin()
        try:
            while self.step < self.config.steps:
                self.trainer.nonfinite.act()  # a non-finite step an evaluation or a change settled
                self.control.boundary()
                if self.control.stop is not None:
                    break
                self._one_step()
            self.events.settle()
            self.trainer.nonfinite.act()
            if self.system.has_steps and (sampled := self.system.sample()) is not None:  # even a short run's steps
                self.emit("system", step=self.step, **sampled)
            if self.control.stop is None:
                self._last_evaluation_and_writes()
            return self._end()
        finally:
            if self.events.event_log is not None and self.events.event_log.unwritten:
                self.unwritten.write(EVENTS, self.events.event_log.flush)

    def _begin(self) -> None:
        """policy.yaml and config.json written, the state ``training``, and the full snapshot for clients that
        connected while loading and for events.jsonl (history of a dead run)."""
        self.record.save_policy()
        self._save_config()
        trainable = f"trainable {self.trainable_count():,} of {count_params(self.model):,}"
        self.control.set_state(RunState.TRAINING, trainable)
        self.record.warn_if_nothing_trains()
        self.log(self.cadence.describe(), "info" if self.cadence.every != 0 else "warning")
        self.emit("hello", **{k: v for k, v in self.hello().items() if k not in ("type", "t")})

    def _one_step(self) -> None:
        """One optimizer step, then the evaluation and checkpoint it makes due."""
        trainer, taken = self.trainer, self.step
        fields = trainer.survive_oom(lambda: trainer.train_step(settled=False), "training step")
        self._after_step(fields if self.step > taken else None)
        trainer.nonfinite.act()
        if self.step == taken:
            return  # out of memory: nothing new to evaluate or save
        if trainer.eval_due():
            self._evaluated(trainer.survive_oom(trainer.evaluate, "evaluation"))
        if self.cadence.due(self.step):
            self.control.save_or_pause()

    def _last_evaluation_and_writes(self) -> None:
        """A run that was not stopped: evaluated and checkpointed at its last step, its policy saved."""
        if self.trainer.evaluated_at != self.step:
            self._evaluated(self.trainer.survive_oom(self.trainer.evaluate, "evaluation"))
            self.saved = None  # evaluation hooks may have changed method state
        if self.saved is None or self.saved[0] != self.step:
            self.control.save_or_pause()
        self.record.save_policy()
        if self.unwritten:
            self.control.boundary()  # the last writes wait for space like any other

    def _end(self) -> str:
        stop = self.control.stop
        if stop is not None:
            self.control.set_state(RunState.STOPPED, stop.reason or f"stopped at step {self.step}")
            return RunState.STOPPED.value
        self.control.set_state(RunState.FINISHED, f"{self.step} steps")
        return RunState.FINISHED.value

    def _save_config(self) -> None:
        if self.run_dir:
            self.unwritten.write(CONFIG, lambda: write_config(self.run_dir, self.config))

    def _after_step(self, fields: dict[str, Any] | None) -> None:
        """After a step (``fields`` None: none was taken): the system event when due, and what trackers had to say."""
        self.system.stepped(fields["step_time"] if fields else None)
        self.cadence.stepped(fields["step_time"] if fields else 0.0)
        if self.system.due() and (sampled := self.system.sample()) is not None:  # None on ranks other than 0
            self.emit("system", step=self.step, **sampled)
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
            self.runtime.on_evaluation(self.step, metrics)
        except TimelineRefused as exc:
            self.control.timeline_failed(exc.entry, exc)

    def close(self) -> None:
        self.events.settle()
        if self.trackers is not None:  # what they still hold is written first; a failure there is a warning like others
            self.sinks.remove(self.trackers)
            for message in self.trackers.close():
                self.log(message, "warning")
            self.trackers = None
        if self.events.event_log is not None:
            left = self.events.event_log.close()
            if left:
                print(f"spu-engine: {left} last events could not be written to {EVENTS}", file=sys.stderr, flush=True)
            self.events.event_log = None
