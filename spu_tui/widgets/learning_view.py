"""Which layers are learning: per-unit gradient norm and update / weight ratio, their trends, and the freeze advisor.

A table rather than a plot: the two quantities differ by orders of magnitude,
and a frozen unit must read as exactly zero.  The bar is log-scaled on the
update ratio (1e-7 .. 1e-2), where fine-tuning updates live.  Each number's
trend is the slope of its last statistics relative to their level.  Below the
table the advisor names the front blocks whose gradient norm has settled
(``spu_engine.core.freeze_advice``, the criterion automatic freezing uses) and why;
``v`` previews freezing them, ``v`` again applies it as a console change
(undone with ``z`` like any other).  Where the panel is too short for a row a
unit, the frozen units fold into one line above the table, so the rows that
train (the end of a frozen prefix) are the ones on screen.
"""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from spu_engine.core.freeze_advice import Advice, advise, trends
from spu_engine.core.memory_view import short_memory
from spu_engine.core.policy import Change, FreezeRule
from spu_engine.core.protocol import PreviewEvent
from spu_tui.run_model import Aspect, RunModel

LOG_LOW, LOG_HIGH = -7.0, -2.0
BAR_FROM = 56  # columns from which the table has room for the update-ratio bar

# unit, grad norm, update ratio (None: no statistics yet), and their trends (None: too few statistics)
Rows = tuple[tuple[str, float | None, float | None, float | None, float | None], ...]


class LearningView(Widget):
    """A plain widget with a reactive row tuple: new statistics repaint it, equal ones cost nothing, and never a layout."""

    WATCHES = (Aspect.UNITS,)

    rows: reactive[Rows | None] = reactive(None)
    advice_line: reactive[str] = reactive("")
    whatif: reactive[str] = reactive("")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.advice: Advice | None = None
        self.proposed: Change | None = None  # the advice previewed by a first `v`, applied by the next while it stands
        self._embeddings_train = False
        self._frozen: frozenset[str] = frozenset()  # units that train nothing now

    def show(self, state: RunModel) -> None:
        units = [u.name for u in state.units]
        self.rows = tuple(
            (t.unit, t.grad_norm, t.update_ratio, t.grad_trend, t.ratio_trend)
            for t in trends(list(state.unit_history), units)
        )
        trains = {u for u in units if state.unit_trainable.get(u, 1.0) > 0}
        self._embeddings_train = "embeddings" in trains
        self._frozen = frozenset(u for u in units if u not in trains)
        advice = advise(list(state.unit_history), [u for u in units if u.startswith("block")], trains)
        if (advice.blocks if advice else None) != (self.advice.blocks if self.advice else None):
            self.proposed, self.whatif = (
                None,
                "",
            )  # a what-if of other blocks no longer stands (new numbers alone do not change it)
        self.advice = advice
        self.advice_line = (
            f"advice: freeze {advice.reason} (v: what if)" if advice else "advice: no front block has settled yet"
        )

    def advice_change(self) -> Change | None:
        """The advice as a freeze change: its blocks, and the embeddings with block 0 (a frozen prefix saves backward)."""
        if self.advice is None:
            return None
        rules = [FreezeRule(layers=[int(b[5:]) for b in self.advice.blocks], trainable=False)]
        if "block0" in self.advice.blocks and self._embeddings_train:
            rules.insert(0, FreezeRule(units=["embeddings"], trainable=False))
        return Change(freeze=rules)

    def show_preview(self, preview: PreviewEvent) -> None:
        if preview.error:
            self.whatif = f"would be refused: {preview.error}"
            return
        share = preview.trainable / preview.total if preview.trainable is not None and preview.total else 0.0
        backward = preview.backward if preview.backward is not None else preview.frozen_prefix_backward
        memory = f", {short_memory(preview.memory)}" if preview.memory is not None else ""
        self.whatif = (
            f"→ trainable {preview.trainable or 0:,} ({share:.1%}), backward ≈ {backward or 0:.0%}{memory}; "
            "v again applies"
        )

    def render(self) -> Group:
        """Numbers and unit names are never cut: below BAR_FROM columns the bar goes; where rows are too many for the
        height, the frozen units fold into one line."""
        width = self.size.width
        table = Table(box=None, expand=True, padding=(0, 1), header_style="bold")
        table.add_column("unit", no_wrap=True)
        table.add_column("‖grad‖", justify="right", no_wrap=True, min_width=7)
        table.add_column("upd/w", justify="right", no_wrap=True, min_width=7)
        table.add_column("trend", justify="right", no_wrap=True, min_width=9)
        with_bar = width >= BAR_FROM
        if with_bar:
            table.add_column("", ratio=1, no_wrap=True)
        bar_width = max(4, width - 44)
        lines = [Text(self.advice_line, style="yellow" if self.advice else "bright_black")] if self.advice_line else []
        if self.whatif:
            lines.append(Text(self.whatif))
        rows = list(self.rows or ())
        folded: list[str] = []
        if self.size.height and 1 + len(rows) + len(lines) > self.size.height:
            folded = [row[0] for row in rows if row[0] in self._frozen]
            rows = [row for row in rows if row[0] not in self._frozen]
        for name, grad_norm, ratio, grad_trend, ratio_trend in rows:
            cells = (
                [name, "-", "-"] if grad_norm is None or ratio is None else [name, f"{grad_norm:.1e}", f"{ratio:.1e}"]
            )
            cells.append(f"{_trend(grad_trend)} {_trend(ratio_trend)}")
            if with_bar:
                cells.append(_bar(ratio, bar_width) if ratio is not None and grad_norm is not None else "")
            table.add_row(*cells)
        if not self.rows:
            table.add_row("waiting for the engine", "", "", "", *([""] if with_bar else []))
        head = [Text(f"frozen: {unit_span(folded)} (folded for room)", style="bright_black")] if folded else []
        return Group(*head, table, *lines)


def unit_span(units: list[str]) -> str:
    """embeddings, block0 .. block7, head -> 'embeddings, block0-7, head': runs of consecutive blocks as ranges."""
    parts: list[str] = []
    run: list[int] = []

    def close() -> None:
        if run:
            parts.append(f"block{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
            run.clear()

    for unit in units:
        index = int(unit[5:]) if unit.startswith("block") and unit[5:].isdigit() else None
        if index is not None and (not run or index == run[-1] + 1):
            run.append(index)
            continue
        close()
        if index is not None:
            run.append(index)
        else:
            parts.append(unit)
    close()
    return ", ".join(parts)


def _trend(slope: float | None) -> str:
    """-0.043 -> '↘4%': the change per statistics interval, relative to the level ('·' until there are enough)."""
    if slope is None:
        return "·"
    arrow = "→" if abs(slope) < 0.005 else "↗" if slope > 0 else "↘"
    return f"{arrow}{min(abs(slope), 9.99):.0%}"


def _bar(ratio: float, width: int) -> Text:
    if ratio <= 0:
        return Text("frozen" if ratio == 0 else "", style="bright_black")
    level = (math.log10(ratio) - LOG_LOW) / (LOG_HIGH - LOG_LOW)
    n = max(1, round(min(1.0, max(0.0, level)) * width))
    return Text("█" * n, style="green")
