"""Experiment trackers (``--report-to tensorboard,wandb,mlflow,trackio``): a mirror of the run's events.

One class per backend behind ``Tracker`` (scalars and texts at a step),
registered in ``TRACKERS``; each imports its package only when a run asks for
it.  ``Trackers`` is the engine's sink for them: the training thread only puts
the event's JSON line on a bounded queue, and a thread of its own hands it to
every backend, so a slow tracker (a network, a disk) costs training nothing.
Trackers are best-effort: a backend that raises is switched off with one
warning (``problems``), and training goes on.  Only rank 0 reports (the engine
makes trackers where it writes the run folder).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import yaml

MIRRORED = ("hello", "step", "eval", "units", "system", "policy", "imp_round")  # the events a tracker sees
QUEUE_EVENTS = 10_000  # events waiting for a stalled tracker before newer ones are dropped
CLOSE_WAIT_S = 30.0  # at the end of a run, how long the trackers may take to write what is queued


class Tracker(ABC):
    """One backend, opened for a run (``step``: where it starts; a resumed run's checkpoint step).  Any method may
    raise: ``Trackers`` then switches this backend off and says so once."""

    name: ClassVar[str]
    module: ClassVar[str]  # what must be importable
    package: ClassVar[str]  # what pip installs

    @abstractmethod
    def __init__(self, run_dir: Path, run: str, config: dict[str, Any], step: int) -> None: ...

    @abstractmethod
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def text(self, step: int, key: str, text: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class TensorBoard(Tracker):
    """Event files in ``<run>/tensorboard/`` (works offline); a resumed run purges what the lost process logged past
    its checkpoint, as ``events.jsonl``'s readers do."""

    name, module, package = "tensorboard", "tensorboard", "tensorboard"

    def __init__(self, run_dir: Path, run: str, config: dict[str, Any], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_thread()
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step or None)
        self.writer.add_text("config", _markdown_code(yaml.safe_dump(config, sort_keys=False)), step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, step: int, key: str, text: str) -> None:
        self.writer.add_text(key, _markdown_code(text), step)

    def close(self) -> None:
        self.writer.close()


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread keeps what it failed to write (an unwritable folder) for the writer's next call,
    where ``Trackers`` says it in one line, and then re-raises it: a 40-line traceback on stderr at exit.  That
    thread's uncaught exceptions are dropped; every other thread's still reach the hook that was there."""
    previous = threading.excepthook
    if getattr(previous, "spu_quiet", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.spu_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class WandB(Tracker):
    """A W&B run (project ``$WANDB_PROJECT``, default ``spu``) named after the run folder; texts as a table of
    (step, text) rows, W&B's way of keeping text over time."""

    name, module, package = "wandb", "wandb", "wandb"

    def __init__(self, run_dir: Path, run: str, config: dict[str, Any], step: int) -> None:
        self.lib = importlib.import_module(self.module)
        self.run = self._init(run_dir, run, config)
        self.rows: dict[str, list[list[Any]]] = {}

    def _init(self, run_dir: Path, run: str, config: dict[str, Any]) -> Any:
        return self.lib.init(project=os.environ.get("WANDB_PROJECT", "spu"), name=run, config=config, dir=str(run_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.lib.log(values, step=step)

    def text(self, step: int, key: str, text: str) -> None:
        rows = self.rows.setdefault(key, [])
        rows.append([step, text])
        self.lib.log({key: self.lib.Table(columns=["step", "text"], data=rows)}, step=step)

    def close(self) -> None:
        self.lib.finish()


class Trackio(WandB):
    """A Trackio run (project ``$TRACKIO_PROJECT``, default ``spu``): W&B's calls, stored locally."""

    name, module, package = "trackio", "trackio", "trackio"

    def _init(self, run_dir: Path, run: str, config: dict[str, Any]) -> Any:
        return self.lib.init(project=os.environ.get("TRACKIO_PROJECT", "spu"), name=run, config=config)


class MLflow(Tracker):
    """An MLflow run where ``$MLFLOW_TRACKING_URI`` points (MLflow's default otherwise), named after the run folder;
    the settings as parameters, texts as artifacts ``<key>/step-NNNNNNN.yaml``."""

    name, module, package = "mlflow", "mlflow", "mlflow"

    def __init__(self, run_dir: Path, run: str, config: dict[str, Any], step: int) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def text(self, step: int, key: str, text: str) -> None:
        self.mlflow.log_text(text, f"{key}/step-{step:07d}.yaml")

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, WandB, MLflow, Trackio)}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def unavailable(names: list[str]) -> str | None:
    """Why these trackers cannot report (the first whose package is missing), or None."""
    for name in names:
        tracker = TRACKERS[name]
        if not installed(tracker.module):
            return f"--report-to {name} needs the {tracker.package} package: pip install {tracker.package}"
    return None


class Trackers:
    """The engine's sink that mirrors events to the backends named in ``report_to``, from a thread of its own."""

    def __init__(self, names: list[str], run_dir: Path) -> None:
        self.names = names
        self.run_dir = run_dir
        self.backends: list[Tracker] = []
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_EVENTS)
        self.dropped = 0
        self._problems: list[str] = []
        self._lock = threading.Lock()
        self._started = False
        self.thread = threading.Thread(target=self._work, name="spu-trackers", daemon=True)
        self.thread.start()

    def __call__(self, line: bytes, ev: dict[str, Any]) -> None:
        """Called by the engine for every event, in the training thread: a queue put, nothing more."""
        if ev["type"] not in MIRRORED:
            return
        try:
            self.queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                self._problem(
                    f"trackers: {QUEUE_EVENTS} events wait for a tracker that does not keep up; newer ones are dropped"
                )

    def problems(self) -> list[str]:
        """The warnings since the last call (a backend switched off, events dropped), for the engine to log."""
        with self._lock:
            taken, self._problems = self._problems, []
        return taken

    def close(self) -> list[str]:
        """Write what is queued (at most ``CLOSE_WAIT_S``), close every backend; the warnings not yet taken."""
        try:
            self.queue.put(None, timeout=CLOSE_WAIT_S)
            self.thread.join(CLOSE_WAIT_S)
        except queue.Full:
            pass
        if self.thread.is_alive():
            self._problem(f"trackers: still writing after {CLOSE_WAIT_S:.0f} s; the last events may be missing there")
        return self.problems()

    # ------------------------------------------------------------------ the trackers' thread

    def _problem(self, message: str) -> None:
        with self._lock:
            self._problems.append(message)

    def _work(self) -> None:
        while (line := self.queue.get()) is not None:
            ev = json.loads(line)
            if not self._started:
                if ev["type"] != "hello":
                    continue  # before the run's snapshot (a resumed run's step) no backend exists
                self._start(ev)
            for backend in list(self.backends):
                try:
                    mirror(backend, ev)
                except Exception as exc:
                    self._fail(backend, exc)
        for backend in self.backends:
            try:
                backend.close()
            except Exception as exc:
                self._problem(f"tracker {backend.name} failed while closing ({type(exc).__name__}: {exc})")

    def _start(self, hello: dict[str, Any]) -> None:
        self._started = True
        config = dict(hello.get("config") or {})
        run = hello.get("run") or self.run_dir.name
        for name in self.names:
            try:
                self.backends.append(TRACKERS[name](self.run_dir, run, config, int(hello.get("step") or 0)))
            except Exception as exc:
                self._problem(
                    f"tracker {name} could not start ({type(exc).__name__}: {exc}); training goes on without it"
                )

    def _fail(self, backend: Tracker, exc: Exception) -> None:
        self.backends.remove(backend)
        self._problem(
            f"tracker {backend.name} failed ({type(exc).__name__}: {exc}); it is switched off, training goes on"
        )
        try:
            backend.close()
        except Exception:
            pass


def mirror(backend: Tracker, ev: dict[str, Any]) -> None:
    """One event to one backend: its numbers as scalars, a policy change as text (the change as YAML)."""
    step = int(ev.get("step") or 0)
    if ev["type"] == "policy":
        record = {
            "step": step,
            "source": ev.get("source"),
            "change": ev.get("change"),
            "trainable": ev.get("trainable"),
        }
        backend.text(step, "policy", yaml.safe_dump(record, sort_keys=False))
        return
    values = scalars(ev)
    if values:
        backend.scalars(step, values)


def scalars(ev: dict[str, Any]) -> dict[str, float]:
    """The event's numbers under tracker names: ``train/loss``, ``eval/accuracy``, ``system/gpu0/utilization``,
    ``units/grad_norm/block3``, ``imp/sparsity`` (lists and texts are left out)."""
    kind = ev["type"]
    out: dict[str, float] = {}
    fields = {k: v for k, v in ev.items() if k not in ("type", "t", "step")}
    if kind == "step":
        _walk(out, "train", fields)
    elif kind == "eval":
        _walk(out, "eval", {k.removeprefix("eval_"): v for k, v in fields.items()})
    elif kind == "system":
        gpus = fields.pop("gpus", None) or {}
        _walk(out, "system", fields)
        for index, stats in gpus.items():
            _walk(out, f"system/gpu{index}", stats)
    elif kind == "units":
        for unit, stats in (fields.get("units") or {}).items():
            for stat, value in (stats or {}).items():
                _walk(out, f"units/{stat}/{unit}", value)
    elif kind == "imp_round":
        _walk(out, "imp", {k: v for k, v in fields.items() if k not in ("kept_by_tensor", "kept_by_unit")})
    return out


def _walk(out: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _walk(out, f"{name}/{key}", inner)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[name] = float(value)


def _markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: indented, YAML stays as it is."""
    return "\n".join("    " + line for line in text.splitlines())
