"""The run browser: every run under a folder with its final metrics; open one, or mark runs to compare.

What ``spu runs`` lists (name, state, steps, final loss, the task's headline
eval metric, when) plus the methods the run's policy had switched on at its
last step.  Reading the folders happens in a worker thread; nothing in them is
written or locked.  Enter opens the highlighted run (a live run is attached, any
other read-only from its history), space marks runs to overlay on the loss
plot, esc goes back with the marks.  A click on a column's header, or ``o``,
sorts by it.  The run's name is never cut (``spu-tui attach`` takes it): the
other columns give way, two lines a row (state over steps, eval over loss, the
date over the time), and the methods wrap in the width that is left.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Static

from spu_engine.core.run_metrics import describe_methods
from spu_engine.core.runs import RunInfo, final_policy, list_runs

COLUMNS = ("", "run", "state", "eval", "methods", "when")  # state over steps, eval over loss, in one column each
MIN_METHODS = 12  # columns the methods wrap in at the least (a wider window gives them the rest)
SORT_KEYS = {  # column -> the value it sorts by (numbers as numbers; missing values last)
    "run": lambda r: r.info.name,
    "state": lambda r: r.info.state,
    "steps": lambda r: r.info.step,
    "loss": lambda r: r.info.loss if r.info.loss is not None else float("inf"),
    "eval": lambda r: r.info.metric_value if r.info.metric_value is not None else float("-inf"),
    "methods": lambda r: r.methods,
    "when": lambda r: r.info.modified,
}
STATE_STYLE = {"live": "bold green", "finished": "cyan", "stopped": "yellow", "error": "bold red", "crashed": "red"}


@dataclass
class RunsChoice:
    """What the browser was left with: a run to open (None: stay) and the runs to compare with it."""

    open: Path | None
    compare: list[Path] = field(default_factory=list)


@dataclass
class RunRow:
    info: RunInfo
    methods: str

    def cells(self, marked: bool, current: bool) -> list[Any]:
        info = self.info
        metric = f"{info.metric} {info.metric_value:.4f}" if info.metric_value is not None else "-"
        metric += " collapsed" if info.collapsed else ""  # one class for every answer: the value is that class's share
        loss = f"loss {info.loss:.4f}" if info.loss is not None else "loss -"
        state = Text(info.state, style=STATE_STYLE.get(info.state, ""))
        return [
            Text("▶" if current else ("✓" if marked else " "), style="bold green"),
            info.name,
            Text.assemble(state, f"\n{info.step}/{info.total_steps or '?'}"),
            Text.assemble(metric, (f"\n{loss}", "bright_black")),
            self.methods,
            time.strftime("%Y-%m-%d\n%H:%M", time.localtime(info.modified)),
        ]

    def widths(self) -> list[int]:
        """The columns each cell needs (its longest line; the methods wrap)."""
        return [max((c.cell_len for c in Text(str(cell)).split()), default=0) for cell in self.cells(False, False)]


def read_runs(root: Path) -> list[RunRow]:
    """Every run under ``root`` with the methods its policy had on at its last event (read-only)."""
    return [RunRow(info, describe_methods(final_policy(info.path))) for info in list_runs(root)]


class RunsLoaded(Message):
    def __init__(self, rows: list[RunRow]) -> None:
        super().__init__()
        self.rows = rows


class RunsScreen(Screen[RunsChoice | None]):
    BINDINGS = [  # enter is the table's: it selects the row (on_data_table_row_selected)
        Binding("space", "mark", "compare"),
        Binding("o", "sort_next", "sort"),
        Binding("escape,q", "close", "back"),
    ]

    def __init__(self, root: Path, current: Path | None = None, marked: list[Path] | None = None) -> None:
        super().__init__()
        self.root = Path(root)
        self.current = current.resolve() if current is not None else None
        self.marked: list[Path] = [p.resolve() for p in marked or []]
        self.rows: dict[str, RunRow] = {}  # row key (the run's resolved path) -> row
        self.table: DataTable = DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        self.sort_column: str | None = None
        self.sort_reverse = False

    def compose(self) -> ComposeResult:
        yield Static(f"runs under {self.root}  [gray](reading …)[/]", id="runs-title")
        yield self.table
        yield Static(
            "[bold reverse] enter [/] open (live: attach; else read-only)  [bold reverse] space [/] mark to compare  "
            "[bold reverse] o [/] sort (or click a header)  [bold reverse] esc [/] back",
            id="runs-keys",
        )

    def on_mount(self) -> None:
        self.table.focus()
        self._read()

    def on_resize(self) -> None:
        if self.rows:
            self._fill(list(self.rows))

    def _fill(self, keys: list[str]) -> None:
        """The table afresh, rows in the order of ``keys``, its columns sized for this width: every column but the
        methods as wide as its longest line, the methods the rest (at least MIN_METHODS), so no name is cut."""
        cursor = self._cursor_key()
        self.table.clear(columns=True)
        needed = [max(len(c), *(row.widths()[i] for row in self.rows.values())) for i, c in enumerate(COLUMNS)]
        padding = 2 * self.table.cell_padding * len(COLUMNS) + 2  # and the vertical scrollbar
        rest = self.size.width - padding - sum(w for c, w in zip(COLUMNS, needed, strict=True) if c != "methods")
        for column, width in zip(COLUMNS, needed, strict=True):
            fitted = min(width, max(MIN_METHODS, rest)) if column == "methods" else width
            self.table.add_column(column, key=column or "mark", width=fitted)
        for key in keys:
            path = Path(key)
            self.table.add_row(*self.rows[key].cells(path in self.marked, path == self.current), key=key, height=None)
        if cursor in self.rows:
            self.table.move_cursor(row=keys.index(cursor))

    @work(thread=True, exclusive=True, group="runs")
    def _read(self) -> None:
        self.post_message(RunsLoaded(read_runs(self.root)))

    def on_runs_loaded(self, message: RunsLoaded) -> None:
        self.rows = {str(row.info.path.resolve()): row for row in message.rows}
        self._fill(list(self.rows))
        count = len(self.rows)
        title = (
            f"runs under {self.root}: {count}"
            if count
            else f"no runs under {self.root} (a run folder holds events.jsonl)"
        )
        self.query_one("#runs-title", Static).update(title + ("  [gray]▶ open now  ✓ compared[/]" if count else ""))

    def _cursor_key(self) -> str | None:
        if not self.rows or self.table.cursor_row < 0 or self.table.row_count == 0:
            return None
        key = self.table.coordinate_to_cell_key((self.table.cursor_row, 0)).row_key.value
        return key

    def action_mark(self) -> None:
        key = self._cursor_key()
        if key is None or Path(key) == self.current:
            return
        path = Path(key)
        if path in self.marked:
            self.marked.remove(path)
        else:
            self.marked.append(path)
        self.table.update_cell(key, "mark", self.rows[key].cells(path in self.marked, False)[0])

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        path = Path(str(event.row_key.value))
        self.dismiss(RunsChoice(path, [p for p in self.marked if p != path]))

    def action_close(self) -> None:
        self.dismiss(RunsChoice(None, list(self.marked)))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        self._sort(str(event.column_key.value))

    def action_sort_next(self) -> None:
        names = list(SORT_KEYS)
        self._sort(
            names[(names.index(self.sort_column) + 1) % len(names)] if self.sort_column in names else names[0],
            toggle=False,
        )

    def _sort(self, column: str, toggle: bool = True) -> None:
        if column not in SORT_KEYS or not self.rows:
            return
        self.sort_reverse = (
            (not self.sort_reverse) if toggle and column == self.sort_column else column in ("eval", "when", "steps")
        )
        self.sort_column = column
        self._fill(sorted(self.rows, key=lambda key: SORT_KEYS[column](self.rows[key]), reverse=self.sort_reverse))
        self.query_one("#runs-title", Static).update(
            f"runs under {self.root}: {len(self.rows)}, by {column}{' (descending)' if self.sort_reverse else ''}  [gray]▶ open now  ✓ compared[/]"
        )
