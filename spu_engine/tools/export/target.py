"""Where ``spu export`` writes: a new (or empty) folder, or a previous export replaced with ``--force``; never a
run or a checkpoint (``core.run_guard``), whatever the flags.

The folder is built in a hidden sibling, ``.NAME.incomplete-PID``, fsynced, then renamed to NAME; a previous
export is renamed to ``.NAME.old-PID`` first and deleted once the new one holds its name
(``core.writes.replace_folder``, as a checkpoint is sealed).  So an export killed midway leaves only that hidden
sibling, never a half-written NAME, and the next export to NAME removes it (its process gone) and needs no
``--force``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spu_engine.core.run_guard import EXPORT_INFO, describe, holder, kind_of, run_of, within
from spu_engine.core.writes import fsync_tree, replace_folder
from spu_engine.tools.export.errors import ExportError

_ASIDE = re.compile(r"\.(?P<name>.+)\.(?P<what>incomplete|old)-(?P<pid>\d+)")


def prepare(out: Path, force: bool, run: Path) -> tuple[Path, list[str]]:
    """The resolved folder to write and notes on what an unfinished export left there; ExportError saying why not
    and where to write instead."""
    target = outside_runs(out, run)
    notes = clear_unfinished(target)
    replaceable(target, out, force)
    return target, notes


def outside_runs(out: Path, run: Path) -> Path:
    """``out`` resolved, refused when it is, or lies in, a run or a checkpoint (``run`` above all), or holds ``run``."""
    target, run_dir = Path(out).expanduser().resolve(), Path(run).expanduser().resolve()
    shown = _shown(out, target)
    found = holder(target)
    if found is None and (target == run_dir or run_dir in target.parents):
        found = (run_dir, "run")
    if found is not None:
        home = run_of(found)
        where = "" if found[0] == target else "inside "
        raise ExportError(
            f"{shown} is {where}{describe(found)}: an export never writes into a run or a checkpoint, with or "
            f"without --force; write outside it, e.g. --out {home.parent / (home.name + '-export')}"
        )
    if target in run_dir.parents:
        raise ExportError(
            f"{shown} holds the run folder {run_dir}: an export never writes over a run; write beside it, e.g. "
            f"--out {run_dir.parent / (run_dir.name + '-export')}"
        )
    return target


def replaceable(target: Path, out: Path, force: bool) -> None:
    """Refuse an existing ``target`` unless it is empty, or a previous export and ``force``."""
    if not target.exists():
        return
    shown = _shown(out, target)
    if not target.is_dir():
        raise ExportError(f"{shown} is a file; an export is a folder: choose a new folder name")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
    if not entries:
        return
    if not (target / EXPORT_INFO).is_file():
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise ExportError(
            f"{shown} is not empty and is not a previous export (no {EXPORT_INFO}): it holds "
            f"{', '.join(entries[:5])}{more}; --force replaces only a previous export: choose a new or empty folder"
        )
    inner = within(target)
    if inner is not None:
        raise ExportError(
            f"{shown} is a previous export but holds {describe(inner)}, which an export never deletes: move it "
            "out first, or choose another folder"
        )
    if not force:
        raise ExportError(
            f"{shown} holds a previous export{_origin(target)}; pass --force to replace it (it is kept until the "
            "new one is complete), or choose another folder"
        )


def clear_unfinished(target: Path) -> list[str]:
    """Remove the ``.NAME.incomplete-PID`` folders of exports to ``target`` whose process is gone, and put back a
    previous export set aside (``.NAME.old-PID``) when the one replacing it never took its name; what was done."""
    notes: list[str] = []
    parent = target.parent
    if not parent.is_dir():
        return notes
    for p in sorted(parent.iterdir()):
        m = _ASIDE.fullmatch(p.name)
        if m is None or m["name"] != target.name or p.is_symlink() or not p.is_dir() or _alive(int(m["pid"])):
            continue
        if kind_of(p) is not None or within(p) is not None:
            continue  # not an export's: never deleted
        if m["what"] == "old" and not target.exists() and (p / EXPORT_INFO).is_file():
            os.rename(p, target)
            notes.append(
                f"put back the previous export {target}, which an interrupted export had set aside as {p.name}"
            )
            continue
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"removed {p.name}, left by an export that did not finish (process {m['pid']} is gone)")
    return notes


@contextmanager
def written_aside(target: Path, force: bool, run: Path) -> Iterator[Path]:
    """The folder to write the export into; when the block ends, it takes ``target``'s name (see the module)."""
    tmp = target.parent / f".{target.name}.incomplete-{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # a dead process's, with this pid
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        outside_runs(target, run)  # checked again: nothing took the name meanwhile
        replaceable(target, target, force)
        replace_folder(tmp, target, target.parent / f".{target.name}.old-{os.getpid()}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a dead process's that had this pid: this one has written nothing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def _shown(out: Path, target: Path) -> str:
    return f"--out {out}" + (f" (that is {target})" if os.path.abspath(out) != str(target) else "")


def _origin(target: Path) -> str:
    try:
        info = json.loads((target / EXPORT_INFO).read_text(encoding="utf-8"))
        return f" (run {info['run']}, step {info['step']})"
    except (OSError, ValueError, TypeError, KeyError):
        return ""
