"""``spu report``: what a run did, read back from ``events.jsonl``, for any run.

``load_run_report`` reads the run through ``runs.read_history`` (so a resumed
run counts each step once) into a ``RunMetrics`` (``run_metrics.py``): a
summary (model, task, steps, final and best metrics, trainable share,
sparsity), the policy changes with their steps, and, when the run used IMP,
its rounds.  Every IMP round ends with an ``imp_round`` event
(``methods/pruning/imp.py``): its sparsity, the kept share of every target
tensor and unit, the mean training loss, the evaluation at its end and its
time.  They come out as rich tables and plotext plots, Markdown or CSV; the
loss and sparsity plots also as an SVG or PNG file (``plot_file``).
Torch-free: it reads the run folder only.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .protocol import ImpRoundEvent, read_event
from .run_metrics import RunMetrics, describe_methods, smoothed
from .runs import EVENTS, read_history
from .writes import atomic_write_bytes, atomic_write_text

TABLES = ("summary", "changes", "rounds")  # what --format csv can write, one table at a time
PLOT_SUFFIXES = (".svg", ".png")
PLOT_ENGINES = ("auto", "matplotlib", "plotext")
COUNTS = (".samples", ".tokens")  # eval fields that count what was evaluated: no final or best to report


class ReportError(ValueError):
    """The run cannot be reported on; the text says why."""


@dataclass
class ImpReport:
    run: Path
    metric: str | None  # the task's headline metric (perplexity, accuracy, f1), as the engine's hello named it
    rounds: list[ImpRoundEvent]
    last_step: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def units(self) -> list[str]:
        """Every unit a round reports, in model order (the order the engine lists them)."""
        return list(dict.fromkeys(u for r in self.rounds for u in r.kept_by_unit))

    @property
    def score(self) -> str:
        """What quality is plotted against sparsity: the task's metric where rounds have it, else eval loss."""
        if self.metric and any(self.metric in r.eval for r in self.rounds):
            return self.metric
        return "eval_loss"


def _history(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The run's events and a note on lines that could not be read; ReportError for a folder that is no run."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    if not (run_dir / EVENTS).is_file():
        raise ReportError(f"{run_dir} is not a run folder (no {EVENTS})")
    damaged: list[int] = []
    history = read_history(run_dir, damaged)
    notes = []
    if damaged:
        shown = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        notes.append(f"{EVENTS}: line{'s' if len(damaged) > 1 else ''} {shown} not readable (cut short by a crash or a full disk?); skipped")
    return history, notes


def load_imp_report(run_dir: Path) -> ImpReport:
    """The IMP rounds of a run folder; ReportError for a folder that is no run or a run without a reported round."""
    run_dir = Path(run_dir)
    history, notes = _history(run_dir)
    return _imp_report(run_dir, history, notes)


def _imp_report(run_dir: Path, history: list[dict[str, Any]], notes: list[str]) -> ImpReport:
    notes = list(notes)
    rounds, unreadable = [], 0
    metric, used_imp, last_step = None, False, 0
    for ev in history:
        kind = ev.get("type")
        if isinstance(ev.get("step"), int):
            last_step = max(last_step, ev["step"])
        if kind == "hello" and isinstance(ev.get("metric"), str):
            metric = ev["metric"]
        if kind in ("hello", "policy"):
            used_imp |= _pruning_method(ev.get("current" if kind == "hello" else "policy")) == "imp"
        if kind == "imp_round":
            typed = read_event(ev)
            if isinstance(typed, ImpRoundEvent):
                rounds.append(typed)
            else:
                unreadable += 1
    if unreadable:
        notes.append(f"{unreadable} imp_round event{'s' if unreadable > 1 else ''} of a shape this version cannot read; skipped")
    if not rounds:
        if used_imp or unreadable:
            raise ReportError(f"{run_dir}: IMP is on but no round has been reported yet (last step {last_step}); "
                              "a round is reported when it has trained round_steps")
        raise ReportError(f"{run_dir}: no IMP rounds to report; this run never set pruning.method: imp "
                          "(pruning: {method: imp, imp: {rounds: ..., fraction: ..., round_steps: ...}})")
    planned = rounds[-1].rounds + 1  # round 0 (the starting mask) and one per pruning
    if rounds[-1].round < planned - 1:
        notes.append(f"{rounds[-1].round + 1} of {planned} rounds reported (round 0 and {planned - 1} prunings); "
                     f"the run's last step is {last_step}")
    return ImpReport(run_dir, metric, rounds, last_step, notes)


def _pruning_method(policy: Any) -> str | None:
    pruning = policy.get("pruning") if isinstance(policy, dict) else None
    return pruning.get("method") if isinstance(pruning, dict) else None


# --------------------------------------------------------------------------- the round table

Column = tuple[str, Callable[[ImpRoundEvent], Any], Callable[[Any], str]]


def _number(digits: int) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else f"{v:.{digits}f}"


def _percent(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}"


def columns(report: ImpReport, per_unit: bool = True) -> list[Column]:
    """(header, value of a round, how to show it); CSV writes the values as they are."""
    cols: list[Column] = [
        ("round", lambda r: r.round, str),
        ("from", lambda r: r.start_step, str),  # the steps the round trained
        ("to", lambda r: r.step, str),
        ("sparsity", lambda r: r.sparsity, _percent),
        ("train loss", lambda r: r.train_loss, _number(4)),
        ("eval loss", lambda r: r.eval.get("eval_loss"), _number(4)),
    ]
    if report.metric and report.metric != "eval_loss":
        metric = report.metric
        cols.append((metric, lambda r: r.eval.get(metric), _number(2 if metric == "perplexity" else 4)))
    cols += [("wall s", lambda r: r.seconds, _number(1)), ("train s", lambda r: r.train_seconds, _number(1))]
    if per_unit:
        cols += [(f"kept {u}", lambda r, u=u: r.kept_by_unit.get(u), _percent) for u in report.units]
    return cols


def to_markdown(report: ImpReport) -> str:
    cols = columns(report)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    lines += ["| " + " | ".join(show(value(r)) for _, value, show in cols) + " |" for r in report.rounds]
    return "\n".join(lines) + "\n"


def to_csv(report: ImpReport) -> str:
    cols = columns(report)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([h for h, _, _ in cols])
    for r in report.rounds:
        writer.writerow(["" if (v := value(r)) is None else v for _, value, _ in cols])
    return buffer.getvalue()


def print_rich(report: ImpReport, console) -> None:
    """The round table, the kept share of every unit by round, and plots of both against sparsity."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"IMP rounds of {report.run}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    cols = columns(report, per_unit=False)
    cells = [[show(value(r)) for _, value, show in cols] for r in report.rounds]
    for i, (header, _, _) in enumerate(cols):  # numbers whole; a two-word header may take two lines
        table.add_column(header, justify="right", min_width=max(len(row[i]) for row in cells))
    for row in cells:
        table.add_row(*row)
    console.print(table)
    layers = Table(title="kept share of each unit's pruning targets, by round", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    layers.add_column("unit")
    for r in report.rounds:
        layers.add_column(f"round {r.round}", justify="right")
    for unit in report.units:
        layers.add_row(unit, *(_percent(r.kept_by_unit.get(unit)) for r in report.rounds))
    console.print(layers)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    width = max(60, min(console.width, 120))
    for plot in plots(report, width):
        console.print(Text.from_ansi(plot))


def plots(report: ImpReport, width: int, height: int = 14) -> list[str]:
    """Terminal plots (plotext): sparsity of each unit by round; the eval score and the round's time against sparsity."""
    import plotext as plt

    rounds, units = report.rounds, report.units
    out = []
    plt.clear_figure()
    plt.plotsize(width, height + 2)
    plt.multiple_bar(units, [[1 - r.kept_by_unit.get(u, 1.0) for u in units] for r in rounds], labels=[f"round {r.round}" for r in rounds])
    plt.ylim(0, 1)
    plt.title("sparsity of each unit, by round")
    out.append(plt.build())
    sparsity = [r.sparsity for r in rounds]
    score = report.score
    for title, values in (
        (f"{score} at each round's end vs sparsity", [r.eval.get(score) for r in rounds]),
        ("round time (s) vs sparsity", [r.seconds for r in rounds]),
    ):
        shown = [(s, v) for s, v in zip(sparsity, values) if isinstance(v, (int, float)) and math.isfinite(v)]
        if not shown:
            continue
        plt.clear_figure()
        plt.plotsize(width, height)
        plt.plot([s for s, _ in shown], [v for _, v in shown], marker="hd")
        plt.title(title)
        plt.xlabel("sparsity")
        out.append(plt.build())
    return out


# --------------------------------------------------------------------------- any run


@dataclass
class RunReport:
    run: Path
    metrics: RunMetrics
    imp: ImpReport | None  # None when the run never reported an IMP round
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[tuple[str, Any, str]]:
        """(field, value, as shown): what the run is, how far it got, its final and best metrics, what it trained."""
        m = self.metrics
        rows: list[tuple[str, Any, str]] = []

        def add(name: str, value: Any, shown: str | None = None) -> None:
            rows.append((name, value, shown if shown is not None else ("-" if value in (None, "") else str(value))))

        add("run", self.run.name)
        add("model", m.config.get("model"))
        add("task", m.task or m.config.get("task"))
        add("data", m.config.get("data"))
        add("steps", m.step, f"{m.step} of {m.config.get('steps', '?')}")
        add("state", m.state)
        add("methods", describe_methods(m.policy))
        loss = m.last("train.loss")
        add("final train loss", loss, _number(4)(loss))
        evals = [n for n in m.names if n.startswith("eval.") and not n.endswith(COUNTS)]
        headline = f"eval.{m.metric}"
        for name in sorted(evals, key=lambda n: (n != headline, n != "eval.loss", n)):
            final, best = m.last(name), m.best(name)
            points = m.series[name]
            add(f"final {name}", final, f"{final:.4f} (step {points.steps[-1]})")
            if best is not None and len(points) > 1:
                add(f"best {name}", best[0], f"{best[0]:.4f} (step {best[1]})")
        trainable = m.last("train.trainable")
        if trainable is not None and m.total_params:
            share = trainable / m.total_params
            add("trainable share", share, f"{share:.2%} ({int(trainable):,} of {m.total_params:,})")
        sparsity = m.last("pruning.sparsity")
        add("sparsity of the pruning targets", sparsity, _percent(sparsity) if sparsity is not None else "- (no pruning)")
        ts = [p.ts[-1] for p in m.series.values() if p.ts]
        if ts and m.start_t:
            add("wall time (s)", round(max(ts) - m.start_t, 1), f"{max(ts) - m.start_t:.0f}")
        return rows

    def changes(self) -> list[tuple[int, str, str]]:
        return [(c.step, c.source, c.text) for c in self.metrics.changes]


def load_run_report(run_dir: Path) -> RunReport:
    """Any run folder's report; ReportError for a folder that is no run (IMP rounds are added when there are some)."""
    run_dir = Path(run_dir)
    history, notes = _history(run_dir)
    metrics = RunMetrics(run_dir.name)
    for ev in history:
        metrics.add(ev)
    imp = None
    if any(ev.get("type") == "imp_round" for ev in history):
        try:
            imp = _imp_report(run_dir, history, notes)
            notes = imp.notes
        except ReportError:  # rounds of a shape this version cannot read: the rest of the report still holds
            notes = [*notes, "the run's imp_round events are of a shape this version cannot read; no round table"]
    return RunReport(run_dir, metrics, imp, notes)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def run_to_markdown(report: RunReport) -> str:
    lines = [f"## {_cell(report.run.name)}", "", "| | |", "|---|---|"]
    lines += [f"| {_cell(name)} | {_cell(shown)} |" for name, _, shown in report.summary()]
    lines += ["", "### Policy changes", ""]
    changes = report.changes()
    if changes:
        lines += ["| step | source | change |", "|---:|---|---|"]
        lines += [f"| {step} | {_cell(source)} | {_cell(text)} |" for step, source, text in changes]
    else:
        lines.append("No policy change during the run.")
    if report.imp is not None:
        lines += ["", "### IMP rounds", "", to_markdown(report.imp).rstrip()]
    return "\n".join(lines) + "\n"


def run_to_csv(report: RunReport, table: str) -> str:
    """One table as CSV: ``summary`` (field,value), ``changes`` (step,source,change) or ``rounds`` (the IMP round table)."""
    if table == "rounds":
        if report.imp is None:
            return to_csv(load_imp_report(report.run))  # says why there are none
        return to_csv(report.imp)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if table == "summary":
        writer.writerow(["field", "value"])
        writer.writerows(["" if value is None else value for value in (name, value)] for name, value, _ in report.summary())
    else:
        writer.writerow(["step", "source", "change"])
        writer.writerows(report.changes())
    return buffer.getvalue()


def print_run_rich(report: RunReport, console) -> None:
    """The summary and the policy changes as tables, then the IMP rounds when the run has them."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"run {report.run}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, _, shown in report.summary():
        table.add_row(name, shown)
    console.print(table)
    changes = Table(title="policy changes", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("step", "source", "change"):
        changes.add_column(header, justify="right" if header == "step" else "left")
    for step, source, text in report.changes():
        changes.add_row(str(step), source, text)
    console.print(changes if report.changes() else "no policy change during the run", highlight=False)
    if report.imp is not None:
        print_rich(report.imp, console)
    else:
        for note in report.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)


# --------------------------------------------------------------------------- plots as files


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


UNIT_COLORS = ("blue", "orange", "green", "red", "magenta", "cyan", "yellow", "gray")


def _plot_panels(m: RunMetrics) -> list[Panel]:
    loss = m.series["train.loss"]
    steps = [float(s) for s in loss.steps]
    lines = [Line("train loss", steps, list(loss.values), "gray"), Line("smoothed", steps, smoothed(list(loss.values)), "cyan")]
    for name, label, color, right in (("eval.loss", "eval loss", "orange", False), (f"eval.{m.metric}", f"eval {m.metric}", "green", True)):
        if points := m.series.get(name):
            lines.append(Line(label, [float(s) for s in points.steps], list(points.values), color, right=right, dots=True))
    panels = [Panel(f"loss of {m.name}", "loss", lines, [float(c.step) for c in m.changes])]
    sparsity = []
    if points := m.series.get("pruning.sparsity"):
        sparsity.append(Line("pruning targets", [float(s) for s in points.steps], list(points.values), "red"))
    for i, unit in enumerate(m.units):
        if (points := m.series.get(f"sparsity.{unit}")) and max(points.values) >= 0.001:  # not the padding row of an embedding
            sparsity.append(Line(unit, [float(s) for s in points.steps], list(points.values), UNIT_COLORS[i % len(UNIT_COLORS)]))
    if sparsity:
        panels.append(Panel(f"sparsity of {m.name}", "sparsity", sparsity, [float(c.step) for c in m.changes], (0.0, 1.0)))
    return panels


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _matplotlib_figure(report: RunReport, panels: list[Panel], fmt: str) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(10, 3.6 * len(panels)), layout="constrained")
    for ax, panel in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        right = ax.twinx() if any(line.right for line in panel.lines) else None
        for line in panel.lines:
            target = right if line.right and right is not None else ax
            color = {"gray": "0.6", "cyan": "tab:cyan", "orange": "tab:orange", "green": "tab:green", "red": "tab:red"}.get(line.color, line.color)
            if line.dots:
                target.plot(line.x, line.y, "o-", color=color, label=line.label, markersize=4, linewidth=1)
            else:
                target.plot(line.x, line.y, color=color, label=line.label, linewidth=0.8 if line.color == "gray" else 1.5)
        for i, step in enumerate(panel.marks):
            ax.axvline(step, color="tab:purple", linestyle="--", linewidth=0.8, label="policy change" if i == 0 else None)
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
            plt.plot(line.x, line.y, label=line.label, color=line.color, marker="hd" if line.dots else "braille",
                     yside="right" if line.right else "left")
        for step in panel.marks:
            plt.vline(step, "magenta")
        if panel.ylim:
            plt.ylim(*panel.ylim)
        plt.title(panel.title + (" (│ policy change)" if panel.marks else ""))
        plt.xlabel("step")
        console.print(Text.from_ansi(plt.build()))
    return console.export_svg(title=f"spu report {report.run.name}")
