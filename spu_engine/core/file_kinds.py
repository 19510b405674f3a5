"""What a path is when it is not a plain file: a FIFO with no writer blocks a read forever and a device never ends, so
every reader of a user's file (a policy, data) refuses them before opening, in one line."""

from __future__ import annotations

import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular(path: Path) -> str | None:
    """What ``path`` is ('a FIFO (named pipe)', 'a folder', ...) when it is not a regular file (a symlink is
    followed); None for a regular file or a path that cannot be looked at (the read says why)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    return next((kind for test, kind in _KINDS if test(mode)), None)
