"""Classification labels checked before training, so a gap in the data never becomes a class.

A row whose label is missing (no such field, empty, blank or null) is refused with its file, its row numbers and the
count, as ``spu eval`` refuses it; ``drop_unlabelled`` (``--drop-unlabelled``) leaves such rows out and says how many
in the run's log.  Training data of a single class is refused: a classifier learns nothing from it (its loss is
already zero, or the other classes are never seen).
"""

from __future__ import annotations

import math
from typing import Any

from spu_engine.core.data import DataError
from spu_engine.tasks.arrow_rows import column_chunks

SHOWN_ROWS = 5  # row numbers a message names before it says how many more
DROP_HINT = "pass --drop-unlabelled (run setting drop_unlabelled: true) to train without them"


def has_label(row: dict[str, Any], column: str) -> bool:
    """False for a field that is absent, None, NaN or only whitespace (a TSV's empty cell)."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def row_numbers(indices: list[int]) -> str:
    """``row 7`` / ``rows 7, 14, 21`` / ``rows 7, 14, 21, 28, 35 and 3 more``: 1-based, data rows after any header."""
    shown = ", ".join(str(i + 1) for i in indices[:SHOWN_ROWS])
    more = f" and {len(indices) - SHOWN_ROWS} more" if len(indices) > SHOWN_ROWS else ""
    return f"row{'s' if len(indices) > 1 else ''} {shown}{more}"


def labelled_rows(
    rows: list[dict[str, Any]], column: str, source: str, drop: bool, hint: str = DROP_HINT
) -> tuple[list[dict[str, Any]], str | None]:
    """The rows that have a label and, when ``drop`` left some out, the note saying so; DataError naming the rows
    without one otherwise (``hint``: what the reader may do about them)."""
    missing = [i for i, row in enumerate(rows) if not has_label(row, column)]
    if not missing:
        return rows, None
    _refuse_or_keep(missing, len(rows), column, source, drop, hint)
    gone = set(missing)
    kept = [row for i, row in enumerate(rows) if i not in gone]
    return kept, _dropped(missing, len(rows), column, source)


def _where(missing: list[int], n: int, column: str) -> str:
    return f"{len(missing)} of {n} rows have no label in column {column!r} ({row_numbers(missing)})"


def _refuse_or_keep(missing: list[int], n: int, column: str, source: str, drop: bool, hint: str) -> None:
    """DataError when no row has a label, or when some have none and ``drop`` was not asked for."""
    if len(missing) == n:
        raise DataError(f"{source}: no row has a label in column {column!r}; name the label column with --label-column")
    if not drop:
        raise DataError(f"{source}: {_where(missing, n, column)}; fill them in, or {hint}")


def _dropped(missing: list[int], n: int, column: str, source: str) -> str:
    return f"{source}: {_where(missing, n, column)}: dropped (--drop-unlabelled), {n - len(missing)} rows remain"


def check_classes(labels: list[str], n: int, column: str, source: str) -> None:
    """DataError when the ``n`` training rows hold one class only (``labels``: their distinct values): there is
    nothing to tell apart."""
    if len(labels) == 1:
        raise DataError(
            f"{source}: all {n} rows have label {labels[0]!r} in column {column!r}: a classifier needs at least two "
            "classes to learn from; add rows of another class (or name the right column with --label-column)"
        )


def labelled_table(table, column: str, source: str, drop: bool) -> tuple[Any, str | None]:
    """``labelled_rows`` for rows on disk (an Arrow table of text, a missing label null): the label column is read a
    chunk at a time, and only when ``drop`` leaves rows out is a new table selected."""
    missing, start = [], 0
    for chunk in column_chunks(table, column):
        missing += [start + i for i, value in enumerate(chunk.to_pylist()) if not has_label({column: value}, column)]
        start += len(chunk)
    if not missing:
        return table, None
    _refuse_or_keep(missing, len(table), column, source, drop, DROP_HINT)
    gone = set(missing)
    kept = table.select(
        [i for i in range(len(table)) if i not in gone],
        new_fingerprint=f"{table._fingerprint}-labelled",
    )
    return kept, _dropped(missing, len(table), column, source)
