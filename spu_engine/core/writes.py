"""Writes of run state fail in one way, whatever the library underneath raised.

A full disk reaches us as ``OSError`` from a plain write, ``RuntimeError`` from
``torch.save`` (``inline_container.cc ... unexpected pos``) or ``SafetensorError``
from safetensors.  ``writing()`` turns any of them, raised inside its block, into
one ``WriteError`` that says what was being written and how much space is free,
so the engine can pause instead of dying.  A folder that cannot be written at all
(a read-only file system, no permission) is said as that, not as a full disk:
freeing space would not help.  Only the write itself goes inside
the block: a bug in the code that prepares what to write is not a full disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FREE_SPACE = "free space"
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(OSError):
    """Run state could not be written; the text says what, why, and the free space where it was going.
    ``remedy`` is what lets a retry succeed ('free space', 'make /runs/x writable')."""

    def __init__(self, message: str, remedy: str = FREE_SPACE) -> None:
        super().__init__(message)
        self.remedy = remedy


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # the loop always returns


def _existing(path: str | Path) -> Path:
    """``path`` or its nearest existing folder."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def free_space(path: str | Path) -> str:
    """'12.3 MB free of 40.0 MB at /mnt/runs', measured at the nearest existing folder of ``path``."""
    where = _existing(path)
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return f"free space at {where} unknown ({exc.strerror or exc})"
    return f"{_size(usage.free)} free of {_size(usage.total)} at {where}"


def describe(exc: BaseException) -> str:
    """The exception's type and the first line of its text (torch's messages run to many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def not_writable(exc: BaseException, where: str | Path) -> str | None:
    """'read-only' or 'not writable' when that is why the write failed: the error's own errno (EROFS, EACCES,
    EPERM), or, for torch and safetensors that turn it into text, the folder itself refusing writes; else None."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in NOT_WRITABLE:
            return "read-only" if cause.errno == errno.EROFS else "not writable"
        cause = cause.__cause__ or cause.__context__
    folder = _existing(where)
    if not os.access(folder, os.W_OK):
        return "not writable"
    return None


@contextmanager
def writing(what: str, where: str | Path) -> Iterator[None]:
    """Any exception inside the block becomes a ``WriteError`` naming ``what`` and the free space at ``where`` (or,
    when ``where`` cannot be written at all, that it is read-only or not writable)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        refused = not_writable(exc, where)
        if refused is None:
            raise WriteError(f"{what} failed ({describe(exc)}); {free_space(where)}") from exc
        folder = _existing(where)
        raise WriteError(
            f"{what} failed ({describe(exc)}); the run folder is {refused}: {folder}", f"make {folder} writable"
        ) from exc


def atomic_write_text(path: Path, text: str, keep_mode_of: Path | None = None) -> None:
    """Write via a temporary file in the same folder, fsync, rename: readers never see half a file.

    Any failure of the write is a ``WriteError`` saying what failed and the free space.  With
    ``keep_mode_of``, the new file gets that file's permission bits.
    """
    atomic_write_bytes(path, text.encode("utf-8"), keep_mode_of)


def atomic_write_bytes(path: Path, data: bytes, keep_mode_of: Path | None = None) -> None:
    """``atomic_write_text`` for bytes (an image, say)."""
    with writing(f"writing {path.name}", path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if keep_mode_of is not None:
                shutil.copymode(keep_mode_of, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder``, then every folder bottom-up, then ``folder`` itself on disk: what a rename of
    ``folder`` then publishes is complete after a power cut too."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        _fsync(f)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        _fsync(sub)
    _fsync(folder)


def replace_folder(tmp: Path, final: Path, aside: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``.  An existing ``final`` is renamed to ``aside`` first and
    deleted only once ``tmp`` holds its name: never deleted before its replacement is in place."""
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_text(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; never replaces an existing file (FileExistsError), whatever races it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with writing(f"writing {path.name}", path.parent):
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
