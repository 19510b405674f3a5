"""Run folders on disk: their files, their lock, what state each run is in.

The one place the names of a run folder's files are written (``EVENTS``,
``POLICY``, ``CONFIG``, ...), and the one writer of ``config.json`` and
``policy.yaml``.  The engine process takes the folder with ``prepare_run_dir``
and ``RunLock``; ``spu runs`` and ``spu-tui attach`` read it with:

- ``is_live(run_dir)``: an engine process holds the folder's lock right now.
- ``run_info(run_dir)``: a ``RunInfo`` (state, step, total steps, last loss,
  last eval metric, last activity), or None for a folder that is not a run.
- ``list_runs(root)``: ``RunInfo`` of every run under ``root``, most recently active first.
- ``newest_live_run(root)``: the most recently active live run folder, or None.
- ``final_policy(run_dir)``: the policy sections in force at the run's last event (the run browser's methods).
- ``never_trained(run_dir)``: the run ended before its first step (no checkpoint, no step logged).
- ``checkpoint_config(run_dir)``: the settings the newest checkpoint holds (a deleted config.json's stand-in).
- ``read_history(run_dir)``: the events of ``events.jsonl`` as one consistent
  history: what a killed engine wrote after the checkpoint its successor
  resumed from is dropped (the ``resumed`` event marks the cut); ``iter_history``
  yields the same events as a stream, which ``spu report`` reads (``report/history.py``).

A run is "live" while its lock is held (an flock, so a killed engine never
looks live); otherwise its last ``state`` event says finished, stopped or
error, and a run whose log ends in training, paused or loading died without
saying so: "crashed".  A run that ended before its first step (stopped while
loading, say) has nothing to resume and nothing to lose: ``never_trained``
tells every command so (``spu runs``, ``--resume``, ``--run-dir``).
Torch-free: the console imports this module.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spu_engine.core.collapse import is_collapsed
from spu_engine.core.run_states import ENDED
from spu_engine.core.writes import atomic_write_text

EVENTS = "events.jsonl"  # every event the engine emitted, one JSON object a line
POLICY = "policy.yaml"  # the replayable policy: run settings, state at step 0, timeline
CONFIG = "config.json"  # the engine's settings (what `--resume` starts from)
ENGINE_LOG = "engine.log"  # the engine process's stdout and stderr
LOCK = "engine.lock"  # flock held by the live engine; holds its pid
SOCKET = "control.sock"  # the live engine's control socket
CHECKPOINTS = "checkpoints"  # step-NNNNNNN folders
RUN_FILES = (EVENTS, POLICY, CONFIG, ENGINE_LOG)  # with CHECKPOINTS: what makes a folder a run
_NOT_METRICS = ("type", "t", "step", "eval_loss", "eval_samples")


class RunFolderError(RuntimeError):
    """The run folder cannot be used; the text says why and what to do."""


class RunInUseError(RunFolderError):
    """The run folder belongs to a live engine."""


class RunLock:
    """An flock on ``engine.lock`` held for the engine's lifetime; records the pid."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUseError(
                f"run folder {self.path.parent} is in use by a live engine (pid {pid}); "
                f"attach to it with `spu-tui attach {self.path.parent}` or choose another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def holds_run(run_dir: Path) -> bool:
    """True if the folder has the files of a run (an events log, a config, or checkpoints)."""
    return any((run_dir / name).is_file() for name in (EVENTS, CONFIG)) or (run_dir / CHECKPOINTS).is_dir()


def never_trained(run_dir: Path) -> bool:
    """A folder of a run that stopped, failed or died before its first step: run files, but no checkpoint and no
    step in its log.  It holds nothing to lose, so a new run may take it without --overwrite, and nothing to resume."""
    run_dir = Path(run_dir)
    if not holds_run(run_dir) or is_live(run_dir):
        return False
    folder = run_dir / CHECKPOINTS
    if folder.is_dir() and any(folder.iterdir()):
        return False
    events = run_dir / EVENTS
    return not events.is_file() or not any(ev.get("type") in ("step", "resumed") for ev in _events_backwards(events))


def checkpoint_config(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The run's settings as its newest checkpoint holds them (``state.json``'s ``config``) and that checkpoint, or
    None: what stands in for a deleted config.json (the checkpoint itself is verified when it is resumed)."""
    folder = Path(run_dir) / CHECKPOINTS
    found = (
        [p for p in folder.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()] if folder.is_dir() else []
    )
    for checkpoint in sorted(found, key=lambda p: int(p.name[5:]), reverse=True):
        try:
            config = json.loads((checkpoint / "state.json").read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config, dict):
            return config, checkpoint
    return None


def clear_run(run_dir: Path) -> None:
    """Delete a run's own files (--overwrite, with the lock held); anything else in the folder stays."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder (0700) and make what is already in it private."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = run_dir.stat().st_uid
    if owner != os.getuid():
        raise RunFolderError(f"run folder {run_dir} belongs to another user (uid {owner}); choose another --run-dir")
    os.chmod(run_dir, 0o700)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            os.chmod(run_dir / name, 0o600)


def open_events(run_dir: Path):
    """Append handle on events.jsonl; a line cut short by a crash is ended first so the next event is readable."""
    f = open(run_dir / EVENTS, "ab+", buffering=0)  # noqa: SIM115 - the caller owns the handle
    if f.seek(0, os.SEEK_END) > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    return f


def write_config(run_dir: Path, config) -> None:
    """``config.json``, atomically: the engine's settings, as ``--resume`` reads them back."""
    atomic_write_text(run_dir / CONFIG, json.dumps(config.model_dump(), indent=1))


def write_policy(run_dir: Path, policy) -> None:
    """``policy.yaml``, atomically: the policy a replay of this run starts from."""
    atomic_write_text(run_dir / POLICY, policy.to_yaml())


@dataclass
class RunInfo:
    path: Path
    state: str  # live | finished | stopped | error | crashed
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    metric: str | None = None  # headline eval metric of the task, e.g. accuracy
    metric_value: float | None = None
    eval_step: int | None = None
    collapsed: bool = False  # the last evaluation gave (nearly) every example one class (core/collapse.py)
    modified: float = 0.0  # unix time of the last event
    pid: int | None = None  # the engine's pid while live
    message: str = ""  # the last state event's message (why it stopped or failed)
    trained: bool = True  # False: it ended before its first step (``never_trained``), nothing to resume

    @property
    def name(self) -> str:
        return self.path.name


def is_live(run_dir: Path) -> bool:
    """True while an engine process holds the run folder's lock (tested with a shared non-blocking flock)."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # closing drops our shared lock at once
    return False


def _events_backwards(path: Path, block: int = 1 << 16) -> Iterator[dict[str, Any]]:
    """Events from the last to the first, reading the file from its end (runs can log many megabytes)."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        carry = b""
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            lines = (f.read(end - start) + carry).split(b"\n")
            carry = lines.pop(0) if start > 0 else b""
            for line in reversed(lines):
                event = _parse(line)
                if event is not None:
                    yield event
            end = start


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except ValueError:  # a line cut short by a crash or a full disk
        return None
    return event if isinstance(event, dict) else None


def _headline_metric(metric: str | None, ev: dict[str, Any]) -> tuple[str, float] | None:
    """The task's own metric (named by the engine's hello) if the eval event has it, else its first number."""
    if metric in ev:
        return metric, ev[metric]
    numbers = [(k, v) for k, v in ev.items() if k not in _NOT_METRICS and isinstance(v, (int, float))]
    return numbers[0] if numbers else None


def _task_metric(path: Path, head: int = 1 << 16) -> str | None:
    """The headline metric the engine's first full hello named; it comes within the log's first lines."""
    with path.open("rb") as f:
        for line in f.read(head).split(b"\n"):
            event = _parse(line)
            if event is not None and event.get("type") == "hello" and isinstance(event.get("metric"), str):
                return event["metric"]
    return None


def run_info(run_dir: Path) -> RunInfo | None:
    """What ``spu runs`` shows for one folder; None if it has no events.jsonl."""
    run_dir = Path(run_dir)
    events = run_dir / EVENTS
    if not events.is_file():
        return None
    config: dict[str, Any] = {}
    try:
        config = json.loads((run_dir / CONFIG).read_text())
    except FileNotFoundError:
        config = (checkpoint_config(run_dir) or ({}, None))[0]
    except (OSError, ValueError):
        pass
    info = RunInfo(path=run_dir, state="crashed", total_steps=config.get("steps"), modified=events.stat().st_mtime)
    last_state = last_step = last_eval = None
    for ev in _events_backwards(events):
        kind = ev.get("type")
        if kind == "state" and last_state is None:
            last_state = ev
        elif kind in ("step", "resumed") and last_step is None:
            last_step = ev
        elif kind == "eval" and last_eval is None:
            last_eval = ev
        if last_state and last_step and last_eval:
            break
    if last_step is not None:
        info.step = last_step.get("step", 0)
        info.loss = last_step.get("loss")
    if last_eval is not None:
        found = _headline_metric(_task_metric(events), last_eval)
        if found:
            info.metric, info.metric_value = found
        info.eval_step = last_eval.get("step")
        info.collapsed = is_collapsed(last_eval)
    if last_state is not None:
        info.message = last_state.get("message", "")
        if last_state.get("state") in ENDED:
            info.state = last_state["state"]
    info.trained = last_step is not None or not never_trained(run_dir)
    if is_live(run_dir):
        info.state = "live"
        try:
            info.pid = int((run_dir / LOCK).read_text().strip())
        except (OSError, ValueError):
            pass
    return info


def final_policy(run_dir: Path) -> dict[str, Any]:
    """The policy sections in force at the run's last event: the newest policy event's, else what the newest hello
    said was in force (the log is read from its end; nothing is validated, so no task code is loaded)."""
    events = Path(run_dir) / EVENTS
    if not events.is_file():
        return {}
    for ev in _events_backwards(events):
        if ev.get("type") == "policy" and isinstance(ev.get("policy"), dict):
            return ev["policy"]
        if ev.get("type") == "hello" and isinstance(ev.get("current"), dict):
            return ev["current"]
    return {}


def run_folders(root: Path) -> list[Path]:
    """Run folders directly under ``root`` (or ``root`` itself if it is one), most recently active first."""
    root = Path(root)
    if (root / EVENTS).is_file():
        return [root]
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / EVENTS).is_file()]
    return sorted(runs, key=lambda p: (p / EVENTS).stat().st_mtime, reverse=True)


def list_runs(root: Path) -> list[RunInfo]:
    return [info for info in map(run_info, run_folders(root)) if info is not None]


def newest_live_run(root: Path) -> Path | None:
    return next((p for p in run_folders(root) if is_live(p)), None)


def read_history(run_dir: Path, damaged: list[int] | None = None) -> list[dict[str, Any]]:
    """All events of the run in order, minus those a killed engine wrote past the checkpoint that was resumed.

    Lines that are not a JSON object (cut short by a crash or a full disk) are skipped; ``damaged``, when
    given, collects their line numbers so that a reader can say so."""
    return list(iter_history(run_dir, damaged))


def iter_history(run_dir: Path, damaged: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """``read_history``'s events one at a time, so a reader holds what it keeps, not the file (``spu report`` on a
    long run).  Two passes: the first finds the ``resumed`` cuts, the second yields each event no later cut drops
    (an event with a step past the cut of a ``resumed`` event after it)."""
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return
    cuts: list[tuple[int, int]] = []  # (line number, step resumed from) of each resumed event
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if b'"resumed"' in line and (ev := _parse(line)) is not None and ev.get("type") == "resumed":
                cut = ev.get("step", 0)
                cuts.append((number, cut if isinstance(cut, int) else 0))
    later_cut = [0] * len(cuts)  # the lowest cut of the resumed events from the i-th on
    for i in range(len(cuts) - 1, -1, -1):
        step = cuts[i][1]
        later_cut[i] = step if i == len(cuts) - 1 else min(step, later_cut[i + 1])
    next_cut = 0  # index of the first resumed event after the line read
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            while next_cut < len(cuts) and cuts[next_cut][0] <= number:
                next_cut += 1
            ev = _parse(line)
            if ev is None:
                if damaged is not None and line.strip():
                    damaged.append(number)
                continue
            step = ev.get("step")
            if next_cut < len(cuts) and isinstance(step, int) and step > later_cut[next_cut]:
                continue
            yield ev
