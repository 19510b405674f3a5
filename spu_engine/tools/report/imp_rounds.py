"""The IMP rounds of a run: read from its ``imp_round`` events, shown as a table (rich, Markdown, CSV) and plots.

Every IMP round ends with an ``imp_round`` event (``methods/pruning/imp.py``): its sparsity, the kept share of
every target tensor and unit, the mean training loss, the evaluation at its end and its time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spu_engine.core.protocol.codec import read_event
from spu_engine.core.protocol.events import ImpRoundEvent
from spu_engine.tools.report.cells import csv_text, number, percent, print_notes, rich_table
from spu_engine.tools.report.history import ReportError, RunEvents, read_run_events


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


def load_imp_report(run_dir: Path) -> ImpReport:
    """The IMP rounds of a run folder; ReportError for a folder that is no run or a run without a reported round."""
    run_dir = Path(run_dir)
    return imp_report(run_dir, read_run_events(run_dir))


def imp_report(run_dir: Path, history: RunEvents) -> ImpReport:
    """The IMP rounds among a run's events (read as a stream); ReportError when there are none."""
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
    notes = history.notes
    if unreadable:
        notes.append(
            f"{unreadable} imp_round event{'s' if unreadable > 1 else ''} of a shape this version cannot read; skipped"
        )
    if not rounds:
        if used_imp or unreadable:
            raise ReportError(
                f"{run_dir}: IMP is on but no round has been reported yet (last step {last_step}); "
                "a round is reported when it has trained round_steps"
            )
        raise ReportError(
            f"{run_dir}: no IMP rounds to report; this run never set pruning.method: imp "
            "(pruning: {method: imp, imp: {rounds: ..., fraction: ..., round_steps: ...}})"
        )
    planned = rounds[-1].rounds + 1  # round 0 (the starting mask) and one per pruning
    if rounds[-1].round < planned - 1:
        notes.append(
            f"{rounds[-1].round + 1} of {planned} rounds reported (round 0 and {planned - 1} prunings); "
            f"the run's last step is {last_step}"
        )
    return ImpReport(run_dir, metric, rounds, last_step, notes)


def _pruning_method(policy: Any) -> str | None:
    pruning = policy.get("pruning") if isinstance(policy, dict) else None
    return pruning.get("method") if isinstance(pruning, dict) else None


# --------------------------------------------------------------------------- the round table

Column = tuple[str, Callable[[ImpRoundEvent], Any], Callable[[Any], str]]


def columns(report: ImpReport, per_unit: bool = True) -> list[Column]:
    """(header, value of a round, how to show it); CSV writes the values as they are."""
    cols: list[Column] = [
        ("round", lambda r: r.round, str),
        ("from", lambda r: r.start_step, str),  # the steps the round trained
        ("to", lambda r: r.step, str),
        ("sparsity", lambda r: r.sparsity, percent),
        ("train loss", lambda r: r.train_loss, number(4)),
        ("eval loss", lambda r: r.eval.get("eval_loss"), number(4)),
    ]
    if report.metric and report.metric != "eval_loss":
        metric = report.metric
        cols.append((metric, lambda r: r.eval.get(metric), number(2 if metric == "perplexity" else 4)))
    cols += [("wall s", lambda r: r.seconds, number(1)), ("train s", lambda r: r.train_seconds, number(1))]
    if per_unit:
        cols += [(f"kept {u}", lambda r, u=u: r.kept_by_unit.get(u), percent) for u in report.units]
    return cols


def to_markdown(report: ImpReport) -> str:
    cols = columns(report)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    lines += ["| " + " | ".join(show(value(r)) for _, value, show in cols) + " |" for r in report.rounds]
    return "\n".join(lines) + "\n"


def to_csv(report: ImpReport) -> str:
    cols = columns(report)
    return csv_text([h for h, _, _ in cols], ([value(r) for _, value, _ in cols] for r in report.rounds))


def print_rich(report: ImpReport, console) -> None:
    """The round table, the kept share of every unit by round, and plots of both against sparsity."""
    from rich.text import Text

    table = rich_table(f"IMP rounds of {report.run}")
    cols = columns(report, per_unit=False)
    cells = [[show(value(r)) for _, value, show in cols] for r in report.rounds]
    for i, (header, _, _) in enumerate(cols):  # numbers whole; a two-word header may take two lines
        table.add_column(header, justify="right", min_width=max(len(row[i]) for row in cells))
    for row in cells:
        table.add_row(*row)
    console.print(table)
    layers = rich_table("kept share of each unit's pruning targets, by round")
    layers.add_column("unit")
    for r in report.rounds:
        layers.add_column(f"round {r.round}", justify="right")
    for unit in report.units:
        layers.add_row(unit, *(percent(r.kept_by_unit.get(unit)) for r in report.rounds))
    console.print(layers)
    print_notes(report.notes, console)
    width = max(60, min(console.width, 120))
    for plot in plots(report, width):
        console.print(Text.from_ansi(plot))


def plots(report: ImpReport, width: int, height: int = 14) -> list[str]:
    """Terminal plots (plotext): sparsity of each unit by round; the eval score and the round's time against
    sparsity."""
    import plotext as plt

    rounds, units = report.rounds, report.units
    out = []
    plt.clear_figure()
    plt.plotsize(width, height + 2)
    plt.multiple_bar(
        units,
        [[1 - r.kept_by_unit.get(u, 1.0) for u in units] for r in rounds],
        labels=[f"round {r.round}" for r in rounds],
    )
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
