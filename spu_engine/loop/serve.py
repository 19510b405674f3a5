"""The engine as its own process: ``spu engine`` (``serve``) and the console's ``spawn_engine``.

``serve`` takes the run folder (``runs.prepare_run_dir`` and its lock), opens
the socket (``transport.EngineServer``), loads the engine and trains; a user
error while loading exits 2 with one line, a crash 1.  ``StopSignals`` turns
SIGTERM and Ctrl-C into a checkpoint and a stop at the next step boundary.
Ranks other than 0 of a multi-process run serve nothing: rank 0 hands them
the commands at every boundary.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spu_engine.core.policy import PolicyError
from spu_engine.core.protocol.codec import encode, event
from spu_engine.core.protocol.commands import PreviewCmd
from spu_engine.core.runs import (
    CHECKPOINTS,
    POLICY,
    SOCKET,
    RunLock,
    clear_run,
    open_events,
    prepare_run_dir,
)
from spu_engine.core.transport import EngineServer


class StoppedWhileLoading(BaseException):
    """A stop signal arrived before the engine existed: nothing was trained, nothing to save."""


class StopSignals:
    """SIGTERM and Ctrl-C stop the run after a checkpoint at the next step boundary, never mid-step.

    A second Ctrl-C stops at once.  SIGHUP is ignored, so closing the terminal
    or losing the SSH session of a foreground ``spu train`` does not stop it.
    Before the engine exists a signal ends loading at once.  The handler only
    sets a flag on the engine: it may run while the training thread holds any lock.
    """

    def __init__(self) -> None:
        self.engine = None
        self.interrupts = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum, handler in (
                (signal.SIGTERM, self._on_signal),
                (signal.SIGINT, self._on_signal),
                (signal.SIGHUP, signal.SIG_IGN),
            ):
                self._previous[signum] = signal.signal(signum, handler)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.engine is None:
            raise StoppedWhileLoading(name)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
        self.engine.request_stop(name)


def _guarded(sink: Callable[[bytes, dict], None]) -> Callable[[bytes, dict], None]:
    """A display that fails (its terminal went away) is switched off; training never stops for one."""
    alive = True

    def call(line: bytes, ev: dict) -> None:
        nonlocal alive
        if alive:
            try:
                sink(line, ev)
            except Exception:
                alive = False

    return call


def _resume(engine, run_dir: Path, fresh_optimizer: bool, policy_note: str | None) -> None:
    """Continue from the newest usable checkpoint; nothing unusable is deleted, and none usable is an error."""
    from spu_engine.storage.checkpoint import checkpoint_to_resume, remove_partial

    folder = run_dir / CHECKPOINTS

    def warn(message: str) -> None:
        engine.log(message, "warning")

    remove_partial(folder, warn)
    path = checkpoint_to_resume(folder, fresh_optimizer, warn)  # CheckpointError: exit 2, every file kept
    engine.loading("checkpoint", f"loading the checkpoint {path.name}")
    if engine.dist is not None:  # the other ranks load the same one, together (a sharded load is a collective)
        engine.dist.broadcast(int(path.name.removeprefix("step-")))
    engine.resume_from(path, fresh_optimizer=fresh_optimizer)
    engine.log(
        f"policy: the one stored in {path.name} (state at step 0 and its timeline)"
        + (f"; {policy_note}" if policy_note else "")
    )
    if engine.step >= engine.config.steps:
        warn(f"the run already reached its {engine.config.steps} steps; pass --steps to train further")


def _serve_worker(config, policy, run_dir: Path, resume: bool, dist, fresh_optimizer: bool = False) -> int:
    """A rank other than 0: no socket, no run-folder writes; commands arrive from rank 0 at each boundary."""
    from spu_engine.core.data import DataError
    from spu_engine.core.model_source import ModelLoadError
    from spu_engine.loop.engine import Engine
    from spu_engine.storage.checkpoint import CheckpointError, list_checkpoints

    signals = StopSignals()
    signals.install()
    try:
        engine = Engine(config, policy, None, dist=dist)
        engine.checkpoints = run_dir / CHECKPOINTS  # its shards of each checkpoint; rank 0 writes the rest
        step = dist.broadcast(None)
        if step is not None:
            path = next(p for p in list_checkpoints(run_dir / CHECKPOINTS) if p.name == f"step-{step:07d}")
            engine.resume_from(path, fresh_optimizer=fresh_optimizer)
    except (PolicyError, ModelLoadError, DataError, CheckpointError, ValueError):
        return 2  # the same user error stops rank 0, which says it; no second copy, no traceback
    signals.engine = engine
    try:
        engine.run()
        code = engine.exit_code
    finally:
        signals.restore()
        engine.close()
        dist.close()
    # everything is written and the process group destroyed: leave without the interpreter's teardown, where gloo's
    # worker threads can still free tensors and abort the process ("terminate called without an active exception",
    # pytorch#179291) after a run that finished
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def preview(engine, cmd) -> dict[str, Any]:
    """The ``preview`` event answering ``cmd``: what its change would do, or why it would be refused."""
    if engine is None:
        return event("preview", id=cmd.id, error="the model is still loading")
    try:
        return event("preview", id=cmd.id, step=engine.step, **engine.preview(cmd.change))
    except PolicyError as exc:
        return event("preview", id=cmd.id, step=engine.step, error=str(exc))
    except Exception as exc:
        return event("preview", id=cmd.id, step=engine.step, error=f"no preview this time ({type(exc).__name__})")


def serve(
    config,
    policy,
    run_dir: Path,
    resume: bool = False,
    sinks: list | None = None,
    *,
    fresh_optimizer: bool = False,
    overwrite: bool = False,
) -> int:
    """Run an engine process: lock the run folder, serve the socket, train.

    Returns the exit code: 0 finished or stopped (SIGTERM included), 1 failed
    or stopped by a fault (non-finite loss, a checkpoint SIGTERM could not write), 2 could not start,
    130 a second Ctrl-C.  A folder this call created is removed again when a user error or a stop signal ends
    the start (nothing was trained).  On resume ``policy`` None means policy.yaml was unreadable: the checkpoint's
    policy is used (it always is) and the unreadable file is kept as ``policy.yaml.unreadable``.
    ``overwrite`` deletes the folder's run files once the lock is held.
    """
    from spu_engine.core.data import DataError
    from spu_engine.core.model_source import ModelLoadError
    from spu_engine.core.run_states import RunState
    from spu_engine.loop.distributed import Distributed
    from spu_engine.storage.checkpoint import CheckpointError

    dist = Distributed.from_env()
    if dist is not None and not dist.is_main:
        return _serve_worker(config, policy, run_dir, resume, dist, fresh_optimizer)
    os.umask(0o077)  # every file and folder this process creates is its owner's alone
    created = not run_dir.exists()
    prepare_run_dir(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    if overwrite and not resume:
        clear_run(run_dir)
    policy_note = None
    if resume and policy is None and (run_dir / POLICY).exists():
        os.replace(run_dir / POLICY, run_dir / f"{POLICY}.unreadable")
        policy_note = "policy.yaml was unreadable and is kept as policy.yaml.unreadable"
    signals = StopSignals()
    early = open_events(run_dir)
    loading = event(
        "hello",
        run=run_dir.name,
        run_dir=str(run_dir),
        pid=os.getpid(),
        state="loading",
        step=0,
        config=config.model_dump(),
    )
    engine_box: dict[str, Any] = {}
    early_commands: list[Any] = []  # commands sent while the model loads run at the first boundary
    handover = threading.Lock()

    def on_command(cmd, cid):
        if isinstance(cmd, PreviewCmd):  # read-only: answered now, from the socket thread
            server.send_to(cid, preview(engine_box.get("engine"), cmd))
            return
        with handover:
            engine = engine_box.get("engine")
            if engine is None:
                early_commands.append(cmd)
            else:
                engine.submit(cmd)

    server = EngineServer(
        run_dir / SOCKET, on_command, lambda: engine_box["engine"].hello() if "engine" in engine_box else loading
    ).start()

    def early_emit(type_: str, **fields: Any) -> None:
        line = encode(event(type_, **fields))
        early.write(line)
        server.broadcast(line)

    untrained = False  # the folder this call made holds a run that never trained: nothing is left behind

    def give_up(code: int, message: str) -> int:
        nonlocal untrained
        untrained = code == 2 and created and not resume
        early_emit("error", step=0, message=message)
        early_emit("state", state="error", step=0, message=message)
        print(f"error: {message}", file=sys.stderr)
        return code

    try:
        try:
            signals.install()
            early_emit("state", state="loading", step=0, message="starting the engine", phase="engine")
            from spu_engine.loop.engine import Engine  # seconds of imports (transformers): said as the engine's start

            engine = Engine(config, policy, run_dir, sinks=[server.broadcast, *map(_guarded, sinks or [])], dist=dist)
            if resume:
                _resume(engine, run_dir, fresh_optimizer, policy_note)
            elif dist is not None:  # the workers start from step 0 too
                dist.broadcast(None)
            signals.engine = engine
        except StoppedWhileLoading as stop:
            untrained = created and not resume
            since = " since the newest checkpoint" if resume else ""
            early_emit(
                "state", state="stopped", step=0, message=f"{stop}: stopped while loading; nothing was trained{since}"
            )
            return 0
        except (PolicyError, ModelLoadError, DataError, CheckpointError, ValueError) as exc:
            return give_up(2, str(exc))
        except Exception as exc:
            traceback.print_exc()
            return give_up(1, f"engine failed while loading: {type(exc).__name__}: {exc}")
        finally:
            early.close()
        with handover:
            for cmd in early_commands:
                engine.submit(cmd)
            engine_box["engine"] = engine
        try:
            engine.run()
            code = engine.exit_code
        except KeyboardInterrupt:
            engine.set_state(RunState.STOPPED, f"interrupted at step {engine.step}; no checkpoint written")
            code = 130
        except Exception as exc:
            traceback.print_exc()
            message = f"engine failed at step {engine.step}: {type(exc).__name__}: {exc}"
            engine.emit("error", step=engine.step, message=message)
            engine.set_state(RunState.ERROR, message)
            code = 1
        finally:
            engine.close()
            if dist is not None:
                dist.close()
        return code
    finally:
        signals.restore()
        time.sleep(0.2)  # let the last events reach clients
        server.close()
        lock.release()
        if untrained:  # nothing was trained in the folder this call made: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"nothing was trained; removed {run_dir}", file=sys.stderr)
