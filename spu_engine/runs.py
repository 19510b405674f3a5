"""Run folders on disk: what state each run is in, and which one to attach to.

The API ``spu runs`` and ``spu-tui attach`` share:

- ``is_live(run_dir)``: an engine process holds the folder's lock right now.
- ``run_info(run_dir)``: a ``RunInfo`` (state, step, total steps, last loss,
  last eval metric, last activity), or None for a folder that is not a run.
- ``list_runs(root)``: ``RunInfo`` of every run under ``root``, most recently active first.
- ``newest_live_run(root)``: the most recently active live run folder, or None.
- ``read_history(run_dir)``: the events of ``events.jsonl`` as one consistent
  history: what a killed engine wrote after the checkpoint its successor
  resumed from is dropped (the ``resumed`` event marks the cut).

A run is "live" while its lock is held (an flock, so a killed engine never
looks live); otherwise its last ``state`` event says finished, stopped or
error, and a run whose log ends in training, paused or loading died without
saying so: "crashed".  Nothing here writes to a run folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .server import LOCK_NAME

EVENTS = "events.jsonl"
ENDED = ("finished", "stopped", "error")
_NOT_METRICS = ("type", "t", "step", "eval_loss", "eval_samples")


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
    modified: float = 0.0  # unix time of the last event
    pid: int | None = None  # the engine's pid while live
    message: str = ""  # the last state event's message (why it stopped or failed)

    @property
    def name(self) -> str:
        return self.path.name


def is_live(run_dir: Path) -> bool:
    """True while an engine process holds the run folder's lock (tested with a shared non-blocking flock)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
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


def _headline_metric(task: str | None, ev: dict[str, Any]) -> tuple[str, float] | None:
    from .tasks import get_task

    try:
        name = get_task(task or "classification").metric
    except ValueError:
        name = None
    if name in ev:
        return name, ev[name]
    numbers = [(k, v) for k, v in ev.items() if k not in _NOT_METRICS and isinstance(v, (int, float))]
    return numbers[0] if numbers else None


def run_info(run_dir: Path) -> RunInfo | None:
    """What ``spu runs`` shows for one folder; None if it has no events.jsonl."""
    run_dir = Path(run_dir)
    events = run_dir / EVENTS
    if not events.is_file():
        return None
    config: dict[str, Any] = {}
    try:
        config = json.loads((run_dir / "config.json").read_text())
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
        found = _headline_metric(config.get("task"), last_eval)
        if found:
            info.metric, info.metric_value = found
        info.eval_step = last_eval.get("step")
    if last_state is not None:
        info.message = last_state.get("message", "")
        if last_state.get("state") in ENDED:
            info.state = last_state["state"]
    if is_live(run_dir):
        info.state = "live"
        try:
            info.pid = int((run_dir / LOCK_NAME).read_text().strip())
        except (OSError, ValueError):
            pass
    return info


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


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """All events of the run in order, minus those a killed engine wrote past the checkpoint that was resumed."""
    history: list[dict[str, Any]] = []
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return history
    with path.open("rb") as f:
        for line in f:
            ev = _parse(line)
            if ev is None:
                continue
            if ev.get("type") == "resumed":
                cut = ev.get("step", 0)
                history = [e for e in history if not (isinstance(e.get("step"), int) and e["step"] > cut)]
            history.append(ev)
    return history
