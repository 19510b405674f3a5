"""Which layers are learning: per-unit gradient norm and update / weight ratio.

A table rather than a plot: the two quantities differ by orders of magnitude,
and a frozen unit must read as exactly zero.  The bar is log-scaled on the
update ratio (1e-7 .. 1e-2), where fine-tuning updates live.
"""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..run_state import Aspect, RunState

LOG_LOW, LOG_HIGH = -7.0, -2.0
BAR_FROM = 44  # columns from which the table has room for the update-ratio bar and whole unit names

Rows = tuple[tuple[str, float | None, float | None], ...]  # unit, grad norm, update ratio (None: no statistics yet)


class LearningView(Widget):
    """A plain widget with a reactive row tuple: new statistics repaint it, equal ones cost nothing, and never a layout."""

    WATCHES = (Aspect.UNITS,)

    rows: reactive[Rows | None] = reactive(None)

    def show(self, state: RunState) -> None:
        self.rows = tuple(
            (u.name, s.grad_norm, s.update_ratio) if (s := state.unit_stats.get(u.name)) else (u.name, None, None)
            for u in state.units
        )

    def render(self) -> Table:
        """Numbers are never cut: below BAR_FROM columns the bar goes, then unit names shorten (block3 -> b3)."""
        width = self.size.width
        table = Table(box=None, expand=True, padding=(0, 1), header_style="bold")
        table.add_column("unit", no_wrap=True, overflow="ellipsis")
        table.add_column("‖grad‖", justify="right", no_wrap=True, min_width=7)
        table.add_column("upd/w", justify="right", no_wrap=True, min_width=7)
        with_bar = width >= BAR_FROM
        if with_bar:
            table.add_column("", ratio=1, no_wrap=True)
        bar_width = max(4, width - 34)
        for name, grad_norm, ratio in self.rows or ():
            shown = name if width >= BAR_FROM else short_unit(name)
            cells = [shown, "-", "-"] if grad_norm is None or ratio is None else [shown, f"{grad_norm:.1e}", f"{ratio:.1e}"]
            if with_bar:
                cells.append(_bar(ratio, bar_width) if ratio is not None and grad_norm is not None else "")
            table.add_row(*cells)
        if not self.rows:
            table.add_row("waiting for the engine", "", "", *([""] if with_bar else []))
        return table


def short_unit(name: str) -> str:
    """block3 -> b3, embeddings -> emb: unit names where columns are few."""
    return "b" + name[5:] if name.startswith("block") else {"embeddings": "emb"}.get(name, name)


def _bar(ratio: float, width: int) -> Text:
    if ratio <= 0:
        return Text("frozen" if ratio == 0 else "", style="bright_black")
    level = (math.log10(ratio) - LOG_LOW) / (LOG_HIGH - LOG_LOW)
    n = max(1, round(min(1.0, max(0.0, level)) * width))
    return Text("█" * n, style="green")
