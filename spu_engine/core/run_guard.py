"""What belongs to a run, so that no export writes there, whatever the path or the flags.

Issue 28: ``spu export --out RUN --force`` overwrote the run's ``config.json`` and ``--out RUN/checkpoints/step-N
--force`` a checkpoint's weights.  Every path here is judged resolved (a symlink to a run is the run) and with
every folder above it: a run folder (``events.jsonl``, SPU's ``config.json``, the lock, or ``checkpoints/`` with
checkpoints in it, as ``runs.holds_run``) or a checkpoint (``manifest.json`` or ``state.json``, as
``storage/checkpoint.py`` writes them, wherever it was copied).  Torch-free: the console checks with it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from spu_engine.core.runs import CHECKPOINTS, CONFIG, ENGINE_LOG, EVENTS, LOCK, POLICY, SOCKET

EXPORT_INFO = "spu_export.json"  # what marks a folder `spu export` wrote (tools/export/card.py)
MANIFEST = "manifest.json"  # a checkpoint's sha256 list (storage/checkpoint.py)
CHECKPOINT_FILES = (MANIFEST, "state.json")
RUN_OWN_FILES = (EVENTS, CONFIG, POLICY, ENGINE_LOG, LOCK, SOCKET)
_CHECKPOINT_ENTRIES = ("step-", ".tmp-", ".old-", "unusable")  # what storage/checkpoint.py puts in checkpoints/


class RunGuardError(ValueError):
    """The path belongs to a run or a checkpoint, or holds what an export may not replace; the text says which
    and where to write instead."""


def _engine_config(path: Path) -> bool:
    """SPU's ``config.json`` (model and task), or one that cannot be read (then assume it is, to be safe); a model's
    or a project's ``config.json`` is not a run."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not isinstance(data, dict) or ("model" in data and "task" in data)


def kind_of(folder: Path) -> str | None:
    """ "checkpoint", "run" or None for a folder (None for a file or nothing)."""
    if not folder.is_dir():
        return None
    if any((folder / name).is_file() for name in CHECKPOINT_FILES):
        return "checkpoint"
    if (folder / EVENTS).is_file() or (folder / LOCK).exists():
        return "run"
    checkpoints = folder / CHECKPOINTS
    if checkpoints.is_dir() and any(p.name.startswith(_CHECKPOINT_ENTRIES) for p in checkpoints.iterdir()):
        return "run"
    config = folder / CONFIG
    if config.is_file() and not (folder / EXPORT_INFO).is_file() and _engine_config(config):
        return "run"
    return None


def holder(path: Path) -> tuple[Path, str] | None:
    """The run or checkpoint that ``path`` (resolved) is or lies in, the nearest first; None if none."""
    target = Path(path).expanduser().resolve()
    for folder in (target, *target.parents):
        kind = kind_of(folder)
        if kind is not None:
            return folder, kind
    return None


def within(folder: Path) -> tuple[Path, str] | None:
    """A run or checkpoint somewhere below ``folder`` (symlinks not followed: deleting one never reaches its
    target); None if none."""
    for top, dirs, _ in os.walk(folder):
        for name in dirs:
            kind = kind_of(Path(top) / name)
            if kind is not None and not (Path(top) / name).is_symlink():
                return Path(top) / name, kind
    return None


def run_of(found: tuple[Path, str]) -> Path:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/step-N``), else the folder itself."""
    folder, kind = found
    if kind == "checkpoint" and folder.parent.name == CHECKPOINTS:
        return folder.parent.parent
    return folder


def describe(found: tuple[Path, str]) -> str:
    """'the run folder R' or 'the checkpoint C of the run R' (or 'the checkpoint C')."""
    folder, kind = found
    if kind == "run":
        return f"the run folder {folder}"
    run = run_of(found)
    return f"the checkpoint {folder} of the run {run}" if run != folder else f"the checkpoint {folder}"


def policy_file_problem(path: Path) -> str | None:
    """Why the console's policy export may not write ``path`` (a run's own file, or anything in a checkpoint or
    in ``checkpoints/``), or None: a new file beside a run's files (the default ``RUN/policy-export.yaml``) is
    fine."""
    target = Path(path).expanduser().resolve()
    found = holder(target.parent)
    if found is None:
        return None
    folder, kind = found
    home = run_of(found) if kind == "run" or run_of(found) != folder else folder.parent
    if kind == "checkpoint" or (folder / CHECKPOINTS) in (target, *target.parents):
        return (
            f"{path} is inside {describe(found)}, which an export never writes; choose a file such as "
            f"{home / 'policy-export.yaml'}"
        )
    if target.parent == folder and target.name in RUN_OWN_FILES:
        return (
            f"{path} is the run's own {target.name} ({describe(found)}), which an export never replaces; choose "
            f"another name, such as {folder / 'policy-export.yaml'}"
        )
    return None
