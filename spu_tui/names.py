"""The one rule for showing a dotted name (a tensor's, a unit's) in fewer columns than it has.

Used wherever the console shortens a name, so a name reads the same in every
panel.  The end of a name (its leaf, ``weight``) is never cut: it is what tells
a tensor's kind.  Leading parts shrink to initials first, front to back
(``a.s.query.lora_A.weight``), then go altogether behind ``…``
(``…query.lora_A.weight``); only a leaf longer than the room is cut, from its
start.  ``shorten_all`` keeps siblings apart: where two names would read the
same, the parts that tell them apart stay whole.
"""

from __future__ import annotations

from collections import defaultdict

ELLIPSIS = "…"


def shorten(name: str, room: int, whole: frozenset[int] = frozenset()) -> str:
    """``name`` in at most ``room`` columns, its end kept; ``whole``: parts (counted from the end, -1 the leaf) kept
    whole while any part can give way."""
    if len(name) <= room:
        return name
    parts = name.split(".")
    n = len(parts)
    kept = {n - 1} | {n + i for i in whole if -n <= i < 0}
    for i in [*range(n - 2), n - 2]:  # the part before the leaf (``lora_A``, ``query``) last
        if i < 0 or i in kept or len(parts[i]) <= 1:
            continue
        parts[i] = parts[i][:1]
        if len(shown := ".".join(parts)) <= room:
            return shown
    for i in range(1, min(kept) + 1):  # leading parts go; the parts kept whole stay
        if len(shown := ELLIPSIS + ".".join(parts[i:])) <= room:
            return shown
    return ELLIPSIS + name[len(name) - max(0, room - 1) :] if room > 1 else name[-room:]


def shorten_all(names: list[str], room: int) -> list[str]:
    """Each of ``names`` by ``shorten``, keeping whole the parts that tell two apart where they would read the same
    (``a.s.q.lora_A.weight`` beside ``a.s.q.lora_B.weight``, not ``a.s.q.l.weight`` twice)."""
    whole: dict[str, frozenset[int]] = {name: frozenset() for name in names}
    shown = [shorten(name, room) for name in names]
    for _ in range(3):  # each round keeps more parts whole; three reach every part that differs within a group
        groups: dict[str, set[str]] = defaultdict(set)
        for name, text in zip(names, shown, strict=True):
            groups[text].add(name)
        clashes = [group for group in groups.values() if len(group) > 1]
        if not clashes:
            break
        for group in clashes:
            differ = frozenset(_differing_parts(list(group)))
            for name in group:
                whole[name] |= differ
        shown = [shorten(name, room, whole[name]) for name in names]
    return shown


def _differing_parts(names: list[str]) -> list[int]:
    """The parts, counted from the end, at which ``names`` are not all the same."""
    split = [name.split(".") for name in names]
    longest = max(len(parts) for parts in split)
    return [-k for k in range(1, longest + 1) if len({parts[-k] if k <= len(parts) else None for parts in split}) > 1]
