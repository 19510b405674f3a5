"""The one place that knows about plotting.

Everything else hands ``Chart`` plain lists (titles and legends live in the
panel border, where they cost no plot rows); swapping textual-plotext for
another plot widget means rewriting this file only.  Drawing is deferred to
``render`` and only happens when the app calls ``redraw`` (at most ~4 Hz).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.app import ComposeResult
from textual.widget import Widget
from textual_plotext import PlotextPlot

MAX_POINTS = 400  # longer series are thinned before plotting


@dataclass
class Series:
    x: list[float]
    y: list[float]
    color: str = "cyan"
    right_axis: bool = False
    marker: str = "braille"


@dataclass
class LineSpec:
    series: list[Series] = field(default_factory=list)
    marks: list[float] = field(default_factory=list)  # vertical lines (policy changes)
    xlabel: str = "step"


@dataclass
class BarSpec:
    labels: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ylim: tuple[float, float] | None = None
    color: str = "orange"


class Chart(Widget):
    DEFAULT_CSS = "Chart { height: 1fr; } Chart > PlotextPlot { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.plot = PlotextPlot()

    def compose(self) -> ComposeResult:
        yield self.plot

    def redraw(self, spec: LineSpec | BarSpec) -> None:
        plt = self.plot.plt
        plt.clear_data()
        plt.clear_figure()
        if isinstance(spec, LineSpec):
            self._lines(plt, spec)
        else:
            self._bars(plt, spec)
        self.plot.refresh()

    @staticmethod
    def _lines(plt, spec: LineSpec) -> None:
        drawn = False
        for s in spec.series:
            x, y = _thin(s.x, s.y)
            if not x:
                continue
            plt.plot(x, y, color=s.color, marker=s.marker, yside="right" if s.right_axis else "left")
            drawn = True
        for m in spec.marks:
            plt.vline(m, "magenta")
        if not drawn:
            plt.text("waiting for the first steps", 0.5, 0.5, alignment="center")
            plt.xlim(0, 1)
            plt.ylim(0, 1)
        plt.xlabel(spec.xlabel)

    @staticmethod
    def _bars(plt, spec: BarSpec) -> None:
        if not spec.labels:
            plt.text("waiting for unit statistics", 0.5, 0.5, alignment="center")
            plt.xlim(0, 1)
            plt.ylim(0, 1)
            return
        plt.bar(spec.labels, spec.values, color=spec.color, width=0.6)
        if spec.ylim:
            plt.ylim(*spec.ylim)


def _thin(x: list[float], y: list[float]) -> tuple[list[float], list[float]]:
    if len(x) <= MAX_POINTS:
        return list(x), list(y)
    stride = -(-len(x) // MAX_POINTS)
    return list(x[::stride]) + [x[-1]], list(y[::stride]) + [y[-1]]
