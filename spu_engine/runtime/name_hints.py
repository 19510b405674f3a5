"""What to suggest for a selector that selects nothing: the same glob with its misspelt words put right, else the
parameter names nearest to it.

A glob such as ``*attentoin*`` compared whole with long parameter names finds unrelated ones (those whose length
fits best); its words compared with the words names are made of (``attention``, ``query``, ``LayerNorm``) find the
one typo, and the repaired glob names what was meant.
"""

from __future__ import annotations

import difflib
import fnmatch
import re

_PIECES = re.compile(r"([*?.\[\]])")  # glob signs and the dots between name parts


def name_hint(pattern: str, names: list[str]) -> str:
    """``; did you mean '*attention*' (24 parameters, e.g. ...)?``, or ``; close matches: a, b``, or nothing."""
    repaired = repaired_glob(pattern, names)
    if repaired is not None:
        hits = [n for n in names if fnmatch.fnmatchcase(n, repaired)]
        example = "" if hits == [repaired] else f" ({len(hits)} parameters, e.g. {hits[0]})"
        return f"; did you mean {repaired!r}{example}?"
    close = close_matches(pattern, names)
    return f"; close matches: {', '.join(close)}" if close else ""


def repaired_glob(pattern: str, names: list[str]) -> str | None:
    """``pattern`` with each word no name contains replaced by the nearest word of the names, when that selects
    something; None when no such repair exists."""
    words = {part for name in names for part in name.split(".")}
    out = []
    for piece in _PIECES.split(pattern):
        if not piece or _PIECES.fullmatch(piece) or any(piece in word for word in words):
            out.append(piece)
            continue
        nearest = difflib.get_close_matches(piece, words, n=1, cutoff=0.6)
        if not nearest:
            return None
        out.append(nearest[0])
    repaired = "".join(out)
    if repaired == pattern or not any(fnmatch.fnmatchcase(n, repaired) for n in names):
        return None
    return repaired


def close_matches(pattern: str, names: list[str], n: int = 3) -> list[str]:
    """Names nearest to a glob that matched nothing (the fallback when no word of it can be put right)."""
    stripped = pattern.replace("*", "").replace("?", "")
    ranked = difflib.get_close_matches(pattern, names, n=n, cutoff=0.3)
    if not ranked and stripped:
        ranked = difflib.get_close_matches(stripped, names, n=n, cutoff=0.2)
    return ranked
