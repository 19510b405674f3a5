"""Any run's report: what the run is, how far it got, its final and best metrics, what it trained, its policy
changes, and its IMP rounds when it has some; shown as rich tables, Markdown or CSV.

``load_run_report`` reads the run's events into a ``RunMetrics`` (``run_metrics.py``), the same named series the
console's metric filter and run comparison read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spu_engine.core.collapse import collapse_note
from spu_engine.core.run_metrics import RunMetrics, describe_methods
from spu_engine.tools.report.cells import csv_text, number, percent, print_notes, rich_table
from spu_engine.tools.report.history import ReportError, read_run_events
from spu_engine.tools.report.imp_rounds import ImpReport, imp_report, load_imp_report, print_rich, to_csv, to_markdown

TABLES = ("summary", "changes", "rounds")  # what --format csv can write, one table at a time
COUNTS = (".samples", ".tokens", ".generated")  # eval fields that count what was evaluated: no final or best to report


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
        add("final train loss", loss, number(4)(loss))
        evals = [n for n in m.names if n.startswith("eval.") and not n.endswith(COUNTS)]
        headline = f"eval.{m.metric}"
        for name in sorted(evals, key=lambda n: (n != headline, n != "eval.loss", n)):
            final, best = m.last(name), m.best(name)
            points = m.series[name]
            add(f"final {name}", final, f"{final:.4f} (step {points.steps[-1]})")
            if best is not None and len(points) > 1:
                add(f"best {name}", best[0], f"{best[0]:.4f} (step {best[1]})")
        collapsed = collapse_note(m.last_eval)
        if collapsed is not None:
            add("final answers", collapsed)
        trainable = m.last("train.trainable")
        if trainable is not None and m.total_params:
            share = trainable / m.total_params
            add("trainable share", share, f"{share:.2%} ({int(trainable):,} of {m.total_params:,})")
        sparsity = m.last("pruning.sparsity")
        add(
            "sparsity of the pruning targets", sparsity, percent(sparsity) if sparsity is not None else "- (no pruning)"
        )
        ts = [p.ts[-1] for p in m.series.values() if p.ts]
        if ts and m.start_t:
            add("wall time (s)", round(max(ts) - m.start_t, 1), f"{max(ts) - m.start_t:.0f}")
        return rows

    def changes(self) -> list[tuple[int, str, str]]:
        return [(c.step, c.source, c.text) for c in self.metrics.changes]


def load_run_report(run_dir: Path) -> RunReport:
    """Any run folder's report; ReportError for a folder that is no run (IMP rounds are added when there are
    some)."""
    run_dir = Path(run_dir)
    history = read_run_events(run_dir)
    metrics = RunMetrics(run_dir.name)
    has_rounds = False
    for ev in history:  # a stream: the report holds its series, not the file
        metrics.add(ev)
        has_rounds |= ev.get("type") == "imp_round"
    notes = history.notes
    imp = None
    if has_rounds:
        try:
            imp = imp_report(run_dir, history)  # a second pass, for the rounds
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
    """One table as CSV: ``summary`` (field,value), ``changes`` (step,source,change) or ``rounds`` (the IMP round
    table)."""
    if table == "rounds":
        if report.imp is None:
            return to_csv(load_imp_report(report.run))  # says why there are none
        return to_csv(report.imp)
    if table == "summary":
        return csv_text(["field", "value"], ((name, value) for name, value, _ in report.summary()))
    return csv_text(["step", "source", "change"], report.changes())


def print_run_rich(report: RunReport, console) -> None:
    """The summary and the policy changes as tables, then the IMP rounds when the run has them."""
    table = rich_table(f"run {report.run}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, _, shown in report.summary():
        table.add_row(name, shown)
    console.print(table)
    changes = rich_table("policy changes")
    for header in ("step", "source", "change"):
        changes.add_column(header, justify="right" if header == "step" else "left")
    for step, source, text in report.changes():
        changes.add_row(str(step), source, text)
    console.print(changes if report.changes() else "no policy change during the run", highlight=False)
    if report.imp is not None:
        print_rich(report.imp, console)
    else:
        print_notes(report.notes, console)
