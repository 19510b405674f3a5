"""The training loop, controllable live at step boundaries.

Commands from any thread go into an inbox; the loop takes them only at a step
boundary (between two optimizer steps), so a change is in force from the next
optimizer step on, and every rank of a multi-process run can take the same
commands at the same step (``CommandSource`` is the one place that decides what
arrives at a boundary).  Every applied change is appended to the policy
timeline with its step, which makes the run replayable from its policy file.
"""

from __future__ import annotations

import gc
import json
import math
import os
import queue
import random
import sys
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .config import EngineConfig
from .distributed import Distributed
from .methods import METHODS
from .model import count_params, load_model, load_tokenizer
from .model_source import resolve_model_name
from .policy import SECTIONS, Change, Policy, PolicyError, TimelineEntry, atomic_write_text, write_new_text
from .protocol import (
    ChangeCmd,
    CheckpointCmd,
    EvaluateCmd,
    ExportCmd,
    HelloCmd,
    PauseCmd,
    ResumeCmd,
    SetPolicyCmd,
    StopCmd,
    UndoCmd,
    encode,
    event,
)
from .tasks import Task, TaskOptions, get_task
from .runtime import PolicyRuntime, TimelineRefused
from .selection import check_policy_against_model
from .writes import WriteError, writing

MAX_NONFINITE_SKIPS = 10  # "skip" turns into "stop" after this many non-finite batches in a row
MAX_UNWRITTEN_EVENTS_BYTES = 16 << 20  # events kept in memory while events.jsonl cannot be written (the run is paused)
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_", "norm.weight")



class Engine(PolicyRuntime):
    """One model, one task, one policy; ``run()`` trains until the step budget or a stop."""

    write_retry_s = 30.0  # a write of run state that failed is tried again this often while the run waits

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
        self.run_dir = Path(run_dir) if run_dir else None
        self.sinks: list[Callable[[bytes, dict], None]] = list(sinks or [])
        self.inbox: queue.Queue = queue.Queue()
        self.state = "loading"
        self.step = 0
        self.samples_seen = 0
        self._stop_requested = False
        self._paused = False
        self._stop_signal: str | None = None  # set by a signal handler; acted on at the next boundary
        self.stop_reason: str | None = None  # why the run stopped, when it was not a plain stop command
        self.fault_stop = False  # the run stopped because of a fault (non-finite loss): exit code 1
        self._nonfinite_streak = 0
        self._saved_step: int | None = None  # step of the last checkpoint written by this process
        self._saved_path: Path | None = None
        # run state that could not be written (checkpoint, events, policy.yaml, config.json -> why): the run waits
        # paused, everything in memory, until a retry (automatic, `s` or resume) writes it
        self._unwritten: dict[str, str] = {}
        self._write_pause = False
        self._retry_at = 0.0
        self._events_backlog: deque[bytes] = deque()  # lines not yet in events.jsonl, in order
        self._backlog_bytes = 0
        self._backlog_dropped = 0
        self._events_torn = False  # a write stopped mid-line: the next one starts a new line
        self._events_file = None
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._events_file = open(self.run_dir / "events.jsonl", "ab", buffering=0)

        if config.threads:
            torch.set_num_threads(config.threads)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        if dist is not None:
            self.device = dist.device
        else:
            self.device = torch.device(config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp_dtype = self._amp_dtype()

        task_cls = get_task(config.task)
        if task is None:
            self.set_state("loading", f"reading and tokenizing {config.data}")
        if tokenizer is None and (task is None or model is None):
            tokenizer = load_tokenizer(config.model)
        self.tokenizer = tokenizer
        if task is None:
            task = task_cls.build(
                config.data,
                tokenizer,
                TaskOptions(
                    max_length=config.max_length,
                    text_column=config.text_column,
                    label_column=config.label_column,
                    max_train_samples=config.max_train_samples,
                    max_eval_samples=config.max_eval_samples,
                    doc_stride=config.doc_stride,
                    eval_split=config.eval_split,
                    seed=config.seed,
                ),
            )
        self.task = task
        for note in task.notes:
            self.log(note, "warning")
        if model is None:
            self.set_state("loading", f"loading the model {config.model}")
            model = load_model(config.model, task_cls.model_kind, num_labels=task.num_labels, tokenizer=tokenizer)
        task.check_fits(model)
        self.model = model.to(self.device)
        self.model.train()
        self.refresh_parameters()
        self.loaded_names = list(self.param_names)

        from .batching import BatchStream

        self.stream = BatchStream(len(task.train), seed=config.seed)
        self.methods = [m(self) for m in METHODS]
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        policy = policy or Policy()
        check_policy_against_model(policy, self.model, self.units, self.names_under)
        self.initial_policy = policy.state()
        self.current = policy.state()
        self.recorded: list[TimelineEntry] = []
        self.undoable: list[Policy] = []  # the sections before each client change, newest last (``undo``)
        self.pending: list[TimelineEntry] = list(policy.timeline)
        self._configure_methods(self.current)
        self._apply_trainable()
        self._step_time_ema: float | None = None

    # ------------------------------------------------------------------ setup

    def _amp_dtype(self) -> torch.dtype | None:
        p = self.config.precision
        if p == "fp32" or self.device.type != "cuda":
            return None
        if p == "bf16" or (p == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if any(k in n for k in NO_DECAY) else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr)
        for g in opt.param_groups:
            g["base_lr"] = self.config.lr
        return opt

    # ------------------------------------------------------------------ events

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        ev = event(type_, **fields)
        line = encode(ev)
        if self._events_file is not None:
            self._events_backlog.append(line)
            self._backlog_bytes += len(line)
            if "events" not in self._unwritten:  # while it fails, retries come from the paused loop, not every event
                self._flush_events()
            self._bound_backlog()
        for sink in self.sinks:
            sink(line, ev)
        return ev

    def _flush_events(self) -> bool:
        """Write the events not yet in events.jsonl, in order; a failure keeps them in memory and pauses the run."""
        try:
            with writing("writing events.jsonl", self.run_dir):
                if self._events_torn:
                    self._write_all(b"\n")
                    self._events_torn = False
                while self._events_backlog:
                    self._write_all(self._events_backlog[0])
                    self._backlog_bytes -= len(self._events_backlog.popleft())
        except WriteError as exc:
            if "events" not in self._unwritten:
                print(f"spu-engine: {exc}; events are kept in memory until it can be written", file=sys.stderr, flush=True)
            self._unwritten["events"] = str(exc)
            return False
        self._unwritten.pop("events", None)
        return True

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._events_file.write(view)
            n = len(view) if n is None else n
            if n <= 0:
                raise OSError(f"events.jsonl took no bytes of a {len(view)}-byte write")
            if n < len(view):
                self._events_torn = True  # the rest may not follow: a retry must not glue its line onto this half
            view = view[n:]
        self._events_torn = False

    def _bound_backlog(self) -> None:
        """Memory is bounded too: past MAX_UNWRITTEN_EVENTS_BYTES the oldest unwritten events go (counted, and said)."""
        while self._backlog_bytes > MAX_UNWRITTEN_EVENTS_BYTES and len(self._events_backlog) > 1:
            self._backlog_bytes -= len(self._events_backlog.popleft())
            self._backlog_dropped += 1
        if self._backlog_dropped and "events" in self._unwritten:
            self._unwritten["events"] += f" ({self._backlog_dropped} oldest unwritten events dropped to bound memory)"
            self._backlog_dropped = 0

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
            units=self.describe_units(),
            policy=self.replayable_policy().model_dump(mode="json", exclude_none=True),
            current=self.current.model_dump(mode="json", exclude_none=True),
            state=self.state,
            step=self.step,
            total_steps=self.config.steps,
            trainable=self.trainable_count(),
            total_params=count_params(self.model),
            device=str(self.device),
        )

    def describe_units(self) -> list[dict[str, Any]]:
        return [
            {
                "name": u.name,
                "numel": u.numel,
                "params": [
                    {"name": n, "numel": self.params[n].numel(), "shape": list(self.params[n].shape), "trainable": self.params[n].requires_grad}
                    for n in u.params
                ],
            }
            for u in self.units
        ]

    def set_state(self, state: str, message: str = "") -> None:
        self.state = state
        self.emit("state", state=state, step=self.step, message=message)

    # ------------------------------------------------------------------ policy

    def replayable_policy(self) -> Policy:
        """Run settings + state at step 0 + every change applied so far + changes still scheduled."""
        return self.initial_policy.model_copy(update={"run": self.config.run_settings(), "timeline": [*self.recorded, *self.pending]})

    def _configure_methods(self, policy: Policy) -> None:
        for m in self.configure_order(policy):
            m.configure(policy, self.step)

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
            trainable_by_unit=self._trainable_by_unit(),
            frozen_tensors=[n for n, p in self.params.items() if not p.requires_grad],
            units=self.describe_units() if self.param_names != names else None,  # a method added or removed tensors
        )
        if self.trainable_count() == 0:
            self.log("no parameter trains now: the freeze rules and the methods together leave none; steps change nothing", "warning")

    def undo(self) -> str:
        """Put back the sections as they were before the last client change, as a change of its own (recorded, so replay stays exact)."""
        if not self.undoable:
            raise PolicyError("undo: nothing to undo (no change from a console since the engine started)")
        old, now = self.undoable[-1].model_dump(mode="json"), self.current.model_dump(mode="json")
        restore = {section: _changed(old[section], now[section]) for section in SECTIONS if old[section] != now[section]}
        self.apply_change(Change(set=restore), source="undo")  # refused (e.g. LoRA has trained): nothing changes
        self.undoable.pop()
        return f"restored {', '.join(restore) or 'nothing (already as it was)'} as before the last change"

    def _trainable_by_unit(self) -> dict[str, float]:
        out = {}
        for u in self.units:
            n = sum(self.params[p].numel() for p in u.params if self.params[p].requires_grad)
            out[u.name] = n / u.numel if u.numel else 0.0
        return out

    def _save_policy(self) -> None:
        if self.run_dir:
            text = self.replayable_policy().to_yaml()
            self._write("policy.yaml", lambda: atomic_write_text(self.run_dir / "policy.yaml", text))

    def _save_config(self) -> None:
        if self.run_dir:
            text = json.dumps(self.config.model_dump(), indent=1)
            self._write("config.json", lambda: atomic_write_text(self.run_dir / "config.json", text))

    def _write(self, what: str, write: Callable[[], Any]) -> bool:
        """One write of run state: a WriteError is remembered (the run pauses at the boundary) instead of raised."""
        try:
            write()
        except WriteError as exc:
            self._unwritten[what] = str(exc)
            return False
        self._unwritten.pop(what, None)
        return True

    def _retry_writes(self) -> bool:
        """Try every write that failed again, events first so the log keeps its order; True when none is left.

        Called by `s`, resume, and every ``write_retry_s`` while the run waits (a headless run with nobody there).
        """
        self._retry_at = time.monotonic() + self.write_retry_s
        if "events" in self._unwritten:
            self._flush_events()
        if "config.json" in self._unwritten:
            self._save_config()
        if "policy.yaml" in self._unwritten:
            self._save_policy()
        if "checkpoint" in self._unwritten:
            self._write("checkpoint", self.save_checkpoint)
        if self._unwritten:
            return False
        if self._write_pause:
            self._write_pause = self._paused = False
            self.log("the writes that failed went through; nothing was lost")
            if not self._stop_requested:
                self.set_state("training", f"resumed at step {self.step}")
        return True

    def _write_message(self) -> str:
        return (
            "; ".join(self._unwritten.values())
            + f". Paused at step {self.step} with everything in memory: free space, then press s (or resume) to retry;"
            f" it is also retried every {self.write_retry_s:g} s"
        )

    def _pause_for_writes(self) -> None:
        if self._write_pause:
            return
        if self.dist is not None:  # other ranks cannot wait in step with rank 0's retries: every rank stops at the next boundary
            if not self._stop_signal:
                self.emit("error", step=self.step, message="; ".join(self._unwritten.values()) + "; stopping every rank", kind="write")
            self._stop_signal = self._stop_signal or "write failure"
            return
        message = self._write_message()
        self._write_pause = self._paused = True
        self._retry_at = time.monotonic() + self.write_retry_s
        self.emit("error", step=self.step, message=message, kind="write")
        self.set_state("paused", message)

    # ------------------------------------------------------------------ commands

    def submit(self, command: Any) -> None:
        """Thread-safe: queue a parsed command for the next step boundary."""
        self.inbox.put(command)

    def _drain(self, block: bool) -> list[Any]:
        cmds = []
        try:
            cmds.append(self.inbox.get(timeout=0.25) if block else self.inbox.get_nowait())
            while True:
                cmds.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def _take_commands(self, block: bool) -> list[Any]:
        """This boundary's commands: rank 0's inbox, broadcast so every rank applies the same ones."""
        if self.dist is None:
            return self._drain(block)
        cmds, signal_name = self.dist.broadcast((self._drain(block) if self.dist.is_main else [], self._stop_signal))
        self._stop_signal = self._stop_signal or signal_name
        return cmds

    def _handle(self, cmd: Any) -> None:
        if isinstance(cmd, HelloCmd):  # read-only (the socket server answers it): nothing to apply, ack or log
            return
        ok, message = True, ""
        name = getattr(cmd, "cmd", "?")
        try:
            if isinstance(cmd, ChangeCmd):
                self.apply_change(cmd.change, source="client")
            elif isinstance(cmd, UndoCmd):
                message = self.undo()
            elif isinstance(cmd, SetPolicyCmd):
                data = cmd.policy.state().model_dump(mode="json", exclude_none=True)
                data.pop("spu_policy", None)
                data.pop("timeline", None)
                self.apply_change(Change(set=data), source="client")
            elif isinstance(cmd, PauseCmd):
                if not self._paused:
                    self._paused = True
                    self.set_state("paused")
            elif isinstance(cmd, ResumeCmd):
                if self._write_pause:  # paused by a failed write: resume means try it again
                    if not self._retry_writes():
                        ok, message = False, "still cannot write: " + "; ".join(self._unwritten.values())
                elif self._paused:
                    self._paused = False
                    self.set_state("training")
            elif isinstance(cmd, StopCmd):
                if cmd.checkpoint:  # a checkpoint that cannot be written: no stop, the run waits paused for space
                    self._unwritten.setdefault("checkpoint", "")
                    if not self._retry_writes():
                        raise WriteError("stop refused, the checkpoint could not be written: " + self._unwritten["checkpoint"])
                self._stop_requested = True
            elif isinstance(cmd, CheckpointCmd):
                self._unwritten.setdefault("checkpoint", "")  # with every other write that failed: `s` retries them all
                if not self._retry_writes():
                    raise WriteError("; ".join(self._unwritten.values()))
                message = str(self._saved_path)
            elif isinstance(cmd, EvaluateCmd):
                self.survive_oom(self.evaluate, "evaluation")
            elif isinstance(cmd, ExportCmd):
                path = Path(cmd.path).expanduser()
                if self.dist is None or self.dist.is_main:
                    self._export(path, cmd.overwrite)
                message = str(path)
        except PolicyError as exc:
            ok, message = False, str(exc)
        except OSError as exc:
            ok, message = False, f"{name}: {exc}"
        self.emit("ack", id=getattr(cmd, "id", None), cmd=name, step=self.step, ok=ok, message=message)
        if not ok:
            self.emit("error", id=getattr(cmd, "id", None), step=self.step, message=message)

    def _export(self, path: Path, overwrite: bool) -> None:
        """The replayable policy to a file the user named: a new file, or an existing one only when the console
        confirmed (``overwrite``), keeping that file's mode."""
        text = self.replayable_policy().to_yaml()
        if path.is_dir():
            raise PolicyError(f"export: {path} is a folder; give a file name")
        if not path.exists():
            try:
                write_new_text(path, text)
                return
            except FileExistsError:
                pass  # created meanwhile: treated as the existing file it now is
        if not overwrite:
            raise PolicyError(f"export: {path} exists; it is replaced only when you confirm (overwrite: true), or choose a new name")
        atomic_write_text(path, text, keep_mode_of=path)

    def _boundary(self) -> None:
        """Everything that may change the run happens here, between two optimizer steps."""
        if not self.fault_stop:
            try:
                self.apply_due(self.step)
            except TimelineRefused as exc:  # validated at load, so the model refused it now: stop rather than diverge
                self._timeline_failed(exc.entry, exc)
        for cmd in self._take_commands(block=False):
            self._handle(cmd)
        self._stop_if_signalled()
        if self._unwritten and not self._stop_requested:
            self._pause_for_writes()
        while self._paused and not self._stop_requested:
            for cmd in self._take_commands(block=True):
                self._handle(cmd)
            self._stop_if_signalled()
            if self._write_pause and time.monotonic() >= self._retry_at and not self._retry_writes():
                self.emit("error", step=self.step, message=self._write_message(), kind="write")

    def _timeline_failed(self, entry: TimelineEntry, exc: PolicyError) -> None:
        """A timeline entry the engine cannot apply at its step: a replay that skipped it would silently diverge,
        so the run stops (exit 1) after a checkpoint that keeps the entry pending."""
        message = f"timeline entry at step {entry.step} cannot be applied: {exc}; stopping rather than diverge from the policy"
        self.emit("error", step=self.step, message=message, kind="timeline")
        self.fault_stop = True
        self.stop_reason = message
        self.save_or_pause()
        self._stop_requested = True

    def request_stop(self, reason: str = "stop requested") -> None:
        """Safe in a signal handler (sets one attribute, takes no lock): checkpoint and stop at the next boundary."""
        self._stop_signal = reason

    def _stop_if_signalled(self) -> None:
        if self._stop_signal and not self._stop_requested:
            self.stop_reason = f"{self._stop_signal}: stopped at step {self.step} after a checkpoint"
            self.log(f"{self._stop_signal}: writing a checkpoint, then stopping", "warning")
            self._stop_requested = True
            self._unwritten.setdefault("checkpoint", "")
            if not self._retry_writes():  # a signal still ends the run, cleanly, saying what was not written (exit 1)
                missing = "; ".join(self._unwritten.values())
                if "checkpoint" in self._unwritten:
                    newest = ckpt.latest_checkpoint(self.run_dir / "checkpoints", log=lambda _m: None) if self.run_dir else None
                    self.stop_reason = (
                        f"{self._stop_signal}: stopped at step {self.step} without a checkpoint ({missing}); "
                        f"the newest complete checkpoint is {newest.name if newest else 'none'}"
                    )
                else:
                    self.stop_reason = f"{self._stop_signal}: stopped at step {self.step} after a checkpoint; not written: {missing}"
                self.fault_stop = True

    # ------------------------------------------------------------------ training

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def next_batch(self, n: int | None = None) -> dict[str, torch.Tensor]:
        """``n`` examples per rank: ranks draw the same global batch and each takes its share."""
        n = n or self.config.batch_size
        if self.dist is None:
            return self.batch_of(self.stream.take(n))
        return self.batch_of(self.dist.shard(self.stream.take(n * self.dist.world_size)))

    def batch_of(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """These training examples, collated (padded to their longest) and on the device."""
        return self._to_device(self.task.collate([self.task.train[i] for i in indices]))

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.task.per_sample_loss(self.model, batch)

    def backward(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad:  # nothing trains (e.g. bias-only skipping with LoRA on a model whose head has no bias)
            return
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _lr_factor(self, step: int) -> float:
        warm = self.config.warmup_steps()
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (self.config.steps - step) / max(1, self.config.steps - warm))

    def _forward_backward(self) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """Loss (detached), samples consumed, extra stats.  Selective backprop replaces this."""
        for m in self.methods:
            if m.active and hasattr(m, "forward_backward"):
                return m.forward_backward(self)
        batch = self.next_batch()
        loss = self.per_sample_loss(batch).mean()
        self.backward(loss)
        return loss.detach(), self.config.batch_size, {}

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        step = self.step
        for m in self.methods:
            m.before_step(step)
        factor = self._lr_factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss, n_samples, extra = self._forward_backward()
        for m in self.methods:
            m.after_backward(step)
        if self.dist is not None:
            loss = self.dist.average_gradients([p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad], loss)
            n_samples *= self.dist.world_size
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            return self._nonfinite(loss_value)
        trainable = [p for p in self.model.parameters() if p.grad is not None]
        stats_due = (step + 1) % self.config.stats_every == 0
        if self.scaler and trainable:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.config.grad_clip > 0 and trainable:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.config.grad_clip)
        elif trainable and not self.scaler:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
        # a finite loss can still give an inf/nan gradient; never step on one (GradScaler handles its own)
        if grad_norm is not None and not self.scaler and not math.isfinite(float(grad_norm)):
            return self._nonfinite(loss_value)
        self._nonfinite_streak = 0
        before = self._pre_stats() if stats_due else None
        if trainable and self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif trainable:  # with no gradient at all (selective backprop kept no sample) no parameter moves
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += n_samples
        for m in self.methods:
            m.after_optimizer_step(step)
        dt = time.perf_counter() - t0
        self._step_time_ema = dt if self._step_time_ema is None else 0.9 * self._step_time_ema + 0.1 * dt
        fields = dict(
            step=self.step,
            loss=round(loss_value, 6),
            lr=self.optimizer.param_groups[0]["lr"],
            step_time=round(dt, 5),
            samples_per_s=round(self.config.batch_size * (self.dist.world_size if self.dist else 1) / self._step_time_ema, 2),
            samples=self.samples_seen,
            trainable=self.trainable_count(),
            **extra,
        )
        for m in self.methods:
            fields.update(m.stats(self.step))
        self.emit("step", **fields)
        if before is not None:
            self._emit_unit_stats(before)
        return fields

    @torch.no_grad()
    def _nonfinite(self, loss_value: float) -> dict[str, Any]:
        """The batch gave a non-finite loss or gradient: the optimizer never steps on it; act as ``faults.on_nonfinite`` says."""
        unit_of = self.units.unit_of
        bad_grads = sorted({unit_of.get(n, n) for n, p in self.params.items() if p.grad is not None and not torch.isfinite(p.grad).all()})
        bad_weights = sorted({unit_of.get(n, n) for n, p in self.params.items() if not torch.isfinite(p).all()})
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite_streak += 1
        action = self.current.faults.on_nonfinite
        what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient (loss {loss_value:.4g})"
        message = f"non-finite {what} in the batch of step {self.step + 1}; non-finite gradients in: {', '.join(bad_grads) or 'no unit'}"
        if bad_weights:
            message += f"; non-finite weights in: {', '.join(bad_weights)}"
        if action == "skip" and self._nonfinite_streak >= MAX_NONFINITE_SKIPS:
            action = "stop"
            message += f"; {self._nonfinite_streak} batches in a row, so skipping does not help"
        message += {"skip": "; batch skipped", "pause": "; paused", "stop": "; stopping"}[action]
        self.emit("error", step=self.step, message=message, kind="nonfinite", loss=str(loss_value), units=bad_grads, weights=bad_weights, action=action)
        if action == "pause":
            self._paused = True
            self.set_state("paused", message)
        elif action == "stop":
            self._stop_requested = True
            self.fault_stop = True
            self.stop_reason = message
            if bad_weights:
                self.log("not checkpointing non-finite weights; the newest checkpoint is the last good state", "warning")
            else:
                self.save_or_pause()
        return {"step": self.step, "loss": loss_value, "skipped": True}

    def save_or_pause(self) -> None:
        """A checkpoint that cannot be written (disk full) pauses the run instead of ending it, state in memory,
        until a retry writes it (automatic, `s` or resume) or the run is stopped."""
        if not self._write("checkpoint", self.save_checkpoint) and self.dist is None:
            self._boundary()

    def survive_oom(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn``; on out-of-memory free what the attempt held and pause instead of dying (nothing trained is lost)."""
        try:
            return fn()
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; other backends say "out of memory"
            if not (isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)):
                raise
            detail = str(exc).strip().split("\n")[0][:300]
        # outside the except block: the traceback and the tensors its frames held are gone
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()
        run = self.run_dir or "RUN"
        if what == "evaluation":
            option, size = "eval_batch_size", max(1, self.config.eval_batch_size // 2)
            how = f"set eval_batch_size to {size} in {run}/config.json, then: spu train --resume {run}"
        else:
            option, size = "batch_size", max(1, self.config.batch_size // 2)
            how = f"spu train --resume {run} --batch-size {size}"
        message = (
            f"out of memory during {what} at step {self.step} ({option} {getattr(self.config, option)}): {detail}. "
            f"Freed gradients and cached memory and paused: resume to retry, or stop (a checkpoint is written) "
            f"and continue with a smaller batch: {how}"
        )
        self.emit("error", step=self.step, message=message, kind="oom", suggested={option: size})
        if not self._paused:
            self._paused = True
            self.set_state("paused", message)
        return None

    @torch.no_grad()
    def _pre_stats(self) -> dict[str, Any]:
        grad_sq: dict[str, float] = {}
        snapshot: dict[str, torch.Tensor] = {}
        for u in self.units:
            total = 0.0
            for n in u.params:
                p = self.params[n]
                if p.grad is not None:
                    total += float(p.grad.float().pow(2).sum())
                snapshot[n] = p.detach().clone()  # every tensor: the update ratio measures real weight change
            grad_sq[u.name] = total
        return {"grad_sq": grad_sq, "snapshot": snapshot}

    @torch.no_grad()
    def _emit_unit_stats(self, before: dict[str, Any]) -> None:
        units: dict[str, dict[str, float]] = {}
        tensors: dict[str, dict[str, Any]] = {}
        snap = before["snapshot"]
        for u in self.units:
            upd, wsq, zeros, trainable_n = 0.0, 0.0, 0, 0
            for n in u.params:
                p = self.params[n]
                z = int((p == 0).sum())
                zeros += z
                tensors[n] = {"trainable": p.requires_grad, "sparsity": round(z / p.numel(), 5)}
                if p.requires_grad:
                    trainable_n += p.numel()
                if n in snap:
                    upd += float((p - snap[n]).float().pow(2).sum())
                    wsq += float(snap[n].float().pow(2).sum())
            units[u.name] = {
                "trainable": round(trainable_n / u.numel, 5),
                "grad_norm": math.sqrt(before["grad_sq"][u.name]),
                "update_ratio": math.sqrt(upd) / math.sqrt(wsq) if wsq > 0 else 0.0,
                "sparsity": round(zeros / u.numel, 5),
            }
        self.emit("units", step=self.step, units=units, tensors=tensors)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        bs = self.config.eval_batch_size
        feats = self.task.eval

        def batches():
            for i in range(0, len(feats), bs):
                if self._stop_signal:  # SIGTERM: the checkpoint must not wait for a long evaluation
                    raise _EvaluationInterrupted
                yield self._to_device(self.task.collate(feats[i : i + bs]))

        try:
            with self._autocast():
                metrics = self.task.evaluate(self.model, batches())
        except _EvaluationInterrupted:
            self.log(f"{self._stop_signal}: evaluation at step {self.step} abandoned", "warning")
            return {}
        finally:
            self.model.train(was_training)
        for m in self.methods:
            m.on_eval(self.step, metrics)
        self.emit("eval", step=self.step, **metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        if not self.run_dir:
            return None
        state = {
            "policy": self.initial_policy.model_copy(update={"timeline": self.recorded}).model_dump(mode="json", exclude_none=True),
            "pending": [e.model_dump(mode="json", exclude_none=True) for e in self.pending],
            "stream": self.stream.state_dict(),
            "samples_seen": self.samples_seen,
            "config": self.config.model_dump(),
            "methods": {type(m).__name__: m.state_dict() for m in self.methods},
            "rng": {
                "torch": torch.get_rng_state().tolist(),
                "python": random.getstate(),
                "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            },
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        tensors = {f"{type(m).__name__}/{k}": v for m in self.methods for k, v in m.tensor_state().items()}
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.model, self.optimizer, state, keep=self.config.keep_checkpoints, method_tensors=tensors
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
        self.step = state["step"]
        self.current = policy.at_step(self.step)
        self._configure_methods(self.current)  # before the weights: a method may add tensors (adapters, LoRA)
        for m in self.methods:
            m.load_state_dict(state.get("methods", {}).get(type(m).__name__, {}))
        self._apply_trainable()
        ckpt.load_weights(path, self.model)
        self._load_optimizer(path, fresh_optimizer)
        tensors = ckpt.load_method_tensors(path)
        for m in self.methods:
            prefix = f"{type(m).__name__}/"
            m.load_tensor_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        self.samples_seen = state.get("samples_seen", 0)
        rng = state["rng"]
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "python" in rng:
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
        # readers of events.jsonl drop the events after this step that the lost process wrote (runs.read_history)
        self.emit("resumed", step=self.step, checkpoint=str(path), message=f"resumed from {path.name} at step {self.step}")

    def _load_optimizer(self, path: Path, fresh_optimizer: bool) -> None:
        problem = ckpt.verify(path) if fresh_optimizer else None
        if problem is None:
            try:
                ckpt.load_optimizer(path, self.optimizer)
                return
            except ckpt.CheckpointError as exc:
                if not fresh_optimizer:
                    run = self.run_dir or path.parent.parent
                    raise ckpt.CheckpointError(
                        f"{exc}. Its weights verify: resume from them with fresh optimizer state: spu train --resume {run} --fresh-optimizer"
                    ) from None
                problem = str(exc)
        self.optimizer.state.clear()  # whatever a failed load left: every tensor starts from zero moments
        self.log(f"{path.name}: optimizer state not used ({problem}); AdamW starts afresh (--fresh-optimizer)", "warning")

    # ------------------------------------------------------------------ run

    def run(self) -> str:
        """Train to ``config.steps`` or until stopped; returns the final state."""
        self._save_policy()
        self._save_config()
        self.set_state("training", f"trainable {self.trainable_count():,} of {count_params(self.model):,}")
        # the full snapshot for clients that connected while loading, and for events.jsonl (history of a dead run)
        self.emit("hello", **{k: v for k, v in self.hello().items() if k not in ("type", "t")})
        try:
            while self.step < self.config.steps:
                self._boundary()
                if self._stop_requested:
                    break
                taken = self.step
                self.survive_oom(self.train_step, "training step")
                if self.step == taken:
                    continue  # batch skipped (non-finite) or out of memory: nothing new to evaluate or save
                if self.config.eval_every and self.step % self.config.eval_every == 0:
                    self.survive_oom(self.evaluate, "evaluation")
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                    self.save_or_pause()
            if not self._stop_requested:
                if not self.config.eval_every or self.step % self.config.eval_every:
                    self.survive_oom(self.evaluate, "evaluation")
                    self._saved_step = None  # evaluation hooks may have changed method state
                if self._saved_step != self.step:
                    self.save_or_pause()
                self._save_policy()
                if self._unwritten:
                    self._boundary()  # the last writes wait for space like any other
            if self._stop_requested:
                self.set_state("stopped", self.stop_reason or f"stopped at step {self.step}")
                return "stopped"
            self.set_state("finished", f"{self.step} steps")
            return "finished"
        finally:
            if self._events_backlog:
                self._flush_events()

    def close(self) -> None:
        if self._events_file is not None:
            if self._events_backlog and not self._flush_events():
                print(f"spu-engine: {len(self._events_backlog)} last events could not be written to events.jsonl", file=sys.stderr, flush=True)
            self._events_file.close()
            self._events_file = None


def _changed(old: Any, now: Any) -> Any:
    """The part of ``old`` that differs from ``now`` (mappings by key; anything else whole), for a change that merges."""
    if isinstance(old, dict) and isinstance(now, dict):
        return {k: _changed(v, now.get(k)) for k, v in old.items() if v != now.get(k)}
    return old


class _EvaluationInterrupted(Exception):
    """A stop signal arrived during evaluation."""
