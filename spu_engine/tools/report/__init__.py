"""``spu report``: what a run did, read back from ``events.jsonl``, for any run.

- ``history.py``: the reading side, a run folder's events (and ``ReportError``).
- ``run.py``: any run's summary (model, task, steps, final and best metrics, trainable share, sparsity) and its
  policy changes, as rich tables, Markdown or CSV.
- ``imp_rounds.py``: the IMP rounds, when the run used IMP: table and terminal plots.
- ``plot_file.py``: the loss and sparsity plots as an SVG or PNG file.
- ``cells.py``: how a value is shown, and the table shapes the reports share.

Torch-free: it reads the run folder only.
"""

from spu_engine.tools.report.history import ReportError, read_run_events
from spu_engine.tools.report.imp_rounds import (
    ImpReport,
    columns,
    load_imp_report,
    plots,
    print_rich,
    to_csv,
    to_markdown,
)
from spu_engine.tools.report.plot_file import PLOT_ENGINES, PLOT_SUFFIXES, Line, Panel, plot_file, terminal_plots_svg
from spu_engine.tools.report.run import TABLES, RunReport, load_run_report, print_run_rich, run_to_csv, run_to_markdown

__all__ = [
    "PLOT_ENGINES",
    "PLOT_SUFFIXES",
    "TABLES",
    "ImpReport",
    "Line",
    "Panel",
    "ReportError",
    "RunReport",
    "columns",
    "load_imp_report",
    "load_run_report",
    "plot_file",
    "plots",
    "print_rich",
    "print_run_rich",
    "read_run_events",
    "run_to_csv",
    "run_to_markdown",
    "terminal_plots_svg",
    "to_csv",
    "to_markdown",
]
