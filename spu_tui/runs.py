"""Run folders on disk: which are live (an engine holds their lock) and which is newest."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from spu_engine.server import LOCK_NAME


def is_live(run_dir: Path) -> bool:
    """True while an engine process holds the run folder's lock."""
    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False


def run_folders(root: Path) -> list[Path]:
    """Run folders under ``root``, newest activity first."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / "events.jsonl").exists()]
    return sorted(runs, key=lambda p: (p / "events.jsonl").stat().st_mtime, reverse=True)


def newest_live_run(root: Path) -> Path | None:
    return next((p for p in run_folders(root) if is_live(p)), None)
