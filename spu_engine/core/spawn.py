"""Start the engine as its own process (``spu engine``), in its own session, so it outlives SSH hangups and a
crashed console. No torch here: the console imports it; the engine's process loads torch, not the console's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spu_engine.core.runs import ENGINE_LOG, RunInUseError, is_live, prepare_run_dir, write_config, write_policy


def spawn_engine(config, policy, run_dir: Path, resume: bool = False):
    """Start ``spu engine`` as its own process in its own session (survives SSH hangups and UI crashes)."""
    if is_live(run_dir):
        raise RunInUseError(
            f"run folder {run_dir} is in use by a live engine; attach to it with `spu-tui attach {run_dir}`"
        )
    prepare_run_dir(run_dir)
    write_config(run_dir, config)
    if policy is not None:  # None: resuming with an unreadable policy.yaml (the checkpoint's policy is used)
        write_policy(
            run_dir, policy.model_copy(update={"run": config.run_settings()})
        )  # this run's settings, not the file's
    log_fd = os.open(run_dir / ENGINE_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    cmd = [sys.executable, "-m", "spu_engine.cli", "engine", "--run-dir", str(run_dir)]
    if resume:
        cmd.append("--resume")
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            umask=0o077,
        )
    finally:
        os.close(log_fd)
