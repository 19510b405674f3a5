"""An ablation report (``Ablation.as_dict``) drawn with rich: ``spu ablate`` prints it, the console shows it.

Kept apart from ``ablation.py`` so the console draws it without importing torch.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text


def ablation_views(report: dict[str, Any]) -> list[Table | Text]:
    """The table of drops, what a collapse means for them, and the heat map when there are spans of more than one block."""
    views: list[Table | Text] = [drop_table(report)]
    if report.get("collapsed"):
        views.append(
            Text(
                f"with every adapter, {report['collapsed']}: a drop near 0 then says nothing about the adapters",
                style="bold yellow",
            )
        )
    if any(s["first"] != s["last"] for s in report["spans"]):
        views.append(heat_map(report))
    return views


def drop_table(report: dict[str, Any]) -> Table:
    """One row per span removed; an ``answers`` column marks the spans whose answers collapsed to one class."""
    metric = report["metric"]
    table = Table(title=f"{metric} with every adapter: {report['baseline']:.4f}", title_justify="left")
    table.add_column("adapters removed")
    table.add_column(metric, justify="right")
    table.add_column("drop", justify="right")
    marked = any(s.get("collapsed") for s in report["spans"])
    if marked:
        table.add_column("answers")
    for s in sorted(report["spans"], key=lambda s: (s["last"] - s["first"], s["first"])):
        where = f"block {s['first']}" if s["first"] == s["last"] else f"blocks {s['first']}-{s['last']}"
        answers = ("[yellow]collapsed to one class[/]" if s.get("collapsed") else "",) if marked else ()
        table.add_row(where, f"{s['value']:.4f}", f"{s['drop']:+.4f}", *answers)
    return table


def heat_map(report: dict[str, Any]) -> Table:
    """Houlsby et al.'s Fig. 6: rows the first block removed, columns the last; redder is a larger drop."""
    drops = {(s["first"], s["last"]): s["drop"] for s in report["spans"]}
    worst = max(drops.values(), default=0.0)
    table = Table(
        title=f"drop in {report['metric']}: first block removed (rows) to last (columns)", title_justify="left"
    )
    table.add_column("from \\ to")
    for b in report["blocks"]:
        table.add_column(str(b), justify="right")
    for first in report["blocks"]:
        cells = []
        for last in report["blocks"]:
            drop = drops.get((first, last))
            if drop is None:
                cells.append("")
                continue
            heat = int(200 * drop / worst) if worst > 0 and drop > 0 else 0
            cells.append(f"[on rgb({40 + heat},{60 - heat // 4},50)] {drop:+.3f} [/]")
        table.add_row(str(first), *cells)
    return table
