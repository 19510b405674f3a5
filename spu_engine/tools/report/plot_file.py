"""``spu report --plot``: the loss plot (and the sparsity plot, when the run logged sparsity) as an SVG or PNG.

The panels are drawn from the run's named series; matplotlib (``pip install 'spu[plots]'``) draws real figures,
and without it an SVG is the terminal plots (plotext) recorded by rich.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from spu_engine.core.run_metrics import RunMetrics, smoothed
from spu_engine.core.writes import atomic_write_bytes, atomic_write_text
from spu_engine.tools.report.history import ReportError
from spu_engine.tools.report.run import RunReport

PLOT_SUFFIXES = (".svg", ".png")
PLOT_ENGINES = ("auto", "matplotlib", "plotext")
UNIT_COLORS = ("blue", "orange", "green", "red", "magenta", "cyan", "yellow", "gray")


def plot_file(report: RunReport, path: Path, engine: str = "auto") -> str:
    """Write the loss plot (and the sparsity plot, when the run logged sparsity) to ``path`` (.svg or .png).

    matplotlib (``pip install 'spu[plots]'``) draws real figures; without it an SVG is
    the terminal plots (plotext) recorded by rich.  Returns what was drawn, for the user."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ReportError(f"--plot {path}: write a .svg or .png file (got {path.suffix or 'no suffix'!r})")
    if engine not in PLOT_ENGINES:
        raise ReportError(f"--plot-engine: {engine!r} is not one of {', '.join(PLOT_ENGINES)}")
    if not report.metrics.series.get("train.loss"):
        raise ReportError(f"{report.run}: no training step logged yet; nothing to plot")
    if engine == "auto":
        engine = "matplotlib" if _has_matplotlib() else "plotext"
    if engine == "matplotlib" and not _has_matplotlib():
        raise ReportError("--plot-engine matplotlib: matplotlib is not installed (pip install 'spu[plots]')")
    if engine == "plotext" and path.suffix.lower() == ".png":
        raise ReportError(f"--plot {path}: a PNG needs matplotlib (pip install 'spu[plots]'); a .svg works without it")
    panels = _plot_panels(report.metrics)
    if engine == "matplotlib":
        atomic_write_bytes(path, _matplotlib_figure(report, panels, path.suffix.lower()[1:]))
    else:
        atomic_write_text(path, terminal_plots_svg(report, panels))
    return f"{' and '.join(p.title for p in panels)} ({engine})"


@dataclass
class Line:
    label: str
    x: list[float]
    y: list[float]
    color: str
    right: bool = False  # on the right axis
    dots: bool = False  # points (evaluations) rather than a line


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: list[Line]
    marks: list[float] = field(default_factory=list)  # policy changes (steps)
    ylim: tuple[float, float] | None = None


def _series_line(m: RunMetrics, name: str, label: str, color: str, **style: bool) -> Line:
    points = m.series[name]
    return Line(label, [float(s) for s in points.steps], list(points.values), color, **style)


def _plot_panels(m: RunMetrics) -> list[Panel]:
    loss = _series_line(m, "train.loss", "train loss", "gray")
    lines = [loss, Line("smoothed", loss.x, smoothed(loss.y), "cyan")]
    for name, label, color, right in (
        ("eval.loss", "eval loss", "orange", False),
        (f"eval.{m.metric}", f"eval {m.metric}", "green", True),
    ):
        if m.series.get(name):
            lines.append(_series_line(m, name, label, color, right=right, dots=True))
    changes = [float(c.step) for c in m.changes]
    panels = [Panel(f"loss of {m.name}", "loss", lines, changes)]
    sparsity = []
    if m.series.get("pruning.sparsity"):
        sparsity.append(_series_line(m, "pruning.sparsity", "pruning targets", "red"))
    for i, unit in enumerate(m.units):
        points = m.series.get(f"sparsity.{unit}")
        if points and max(points.values) >= 0.001:  # not the padding row of an embedding
            sparsity.append(_series_line(m, f"sparsity.{unit}", unit, UNIT_COLORS[i % len(UNIT_COLORS)]))
    if sparsity:
        panels.append(Panel(f"sparsity of {m.name}", "sparsity", sparsity, changes, (0.0, 1.0)))
    return panels


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


MATPLOTLIB_COLORS = {"gray": "0.6", "cyan": "tab:cyan", "orange": "tab:orange", "green": "tab:green", "red": "tab:red"}


def _matplotlib_figure(report: RunReport, panels: list[Panel], fmt: str) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(10, 3.6 * len(panels)), layout="constrained")
    for ax, panel in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        right = ax.twinx() if any(line.right for line in panel.lines) else None
        for line in panel.lines:
            target = right if line.right and right is not None else ax
            color = MATPLOTLIB_COLORS.get(line.color, line.color)
            if line.dots:
                target.plot(line.x, line.y, "o-", color=color, label=line.label, markersize=4, linewidth=1)
            else:
                target.plot(
                    line.x, line.y, color=color, label=line.label, linewidth=0.8 if line.color == "gray" else 1.5
                )
        for i, step in enumerate(panel.marks):
            ax.axvline(
                step, color="tab:purple", linestyle="--", linewidth=0.8, label="policy change" if i == 0 else None
            )
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        handles, labels = ax.get_legend_handles_labels()
        if right is not None:
            more = right.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
            right.set_ylabel(report.metrics.metric)
        ax.legend(handles, labels, loc="best", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=150)
    return buffer.getvalue()


def terminal_plots_svg(report: RunReport, panels: list[Panel], width: int = 120, height: int = 24) -> str:
    """The panels as terminal plots (plotext), recorded by rich as an SVG: no extra package needed."""
    import plotext as plt
    from rich.console import Console
    from rich.text import Text

    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    for panel in panels:
        plt.clear_figure()
        plt.plotsize(width, height)
        plt.theme("dark")
        for line in panel.lines:
            plt.plot(
                line.x,
                line.y,
                label=line.label,
                color=line.color,
                marker="hd" if line.dots else "braille",
                yside="right" if line.right else "left",
            )
        for step in panel.marks:
            plt.vline(step, "magenta")
        if panel.ylim:
            plt.ylim(*panel.ylim)
        plt.title(panel.title + (" (│ policy change)" if panel.marks else ""))
        plt.xlabel("step")
        console.print(Text.from_ansi(plt.build()))
    return console.export_svg(title=f"spu report {report.run.name}")
