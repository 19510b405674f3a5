"""How ``spu report`` shows a value in a cell, and the table shapes its reports share (CSV text, rich tables)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from typing import Any


def number(digits: int) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else f"{v:.{digits}f}"


def percent(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}"


def csv_text(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A table as CSV, values as they are (None as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def rich_table(title: str, **options: Any):
    """A rich table in the reports' one style: title on the left, a rule under the header, no outer padding."""
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, **options)


def print_notes(notes: Iterable[str], console) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
