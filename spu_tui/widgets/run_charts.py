"""The run's plots: losses over steps (with the steps the policy changed at), and sparsity per unit.

The loss panel has three views: the console's own run (train loss, its smoothed
curve, eval loss and the task's metric); the same run with other runs overlaid
(``c``, ``--compare``: one colour per run, each with its policy-change marks);
and, while a metric filter is set (``/``), every logged metric whose name
matches the glob, for every run shown.  ``w`` switches the x axis between
steps and wall time (minutes since each run's first event).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input, Static

from spu_engine.core.run_metrics import Points, RunMetrics, matching
from spu_tui.compare import COLORS, ComparedRun
from spu_tui.run_model import Aspect, RunModel
from spu_tui.widgets.chart import BarSpec, Chart, LineSpec, Series

LOSS_LEGEND = (
    "[gray]loss[/] [cyan]smoothed[/] [yellow]eval loss[/] [green]{metric} (right axis)[/] [magenta]│ policy change[/]"
)
LOSS_LEGEND_SHORT = "[gray]loss[/] [cyan]smooth[/] [yellow]eval[/] [green]{metric:.3}→[/] [magenta]│chg[/]"
COLLAPSED_MARK = "[bold red]collapsed to one class[/] "  # the newest evaluation's answers were one class
COMPARE_KEY = "─ loss (smoothed) • eval loss ▞ {metric}→ │ change"
LEGEND_FROM = 72  # columns from which the loss legend is written out (it takes about 62)
ONE_SCALE_SPREAD = 100.0  # metric filter: series whose largest values differ more than this get a 0-1 range each
MAX_SERIES = 8  # metric filter: at most this many series on one plot (the rest are named, not drawn)
SMOOTHING = 0.9


class MetricFilter(Input):
    """The glob over metric names that the loss panel plots (``/``); esc clears it and goes back to the losses."""

    BINDINGS = [Binding("escape", "clear", "clear the filter", show=False)]

    class Cleared(Message):
        pass

    def action_clear(self) -> None:
        self.value = ""
        self.post_message(self.Cleared())


class LossChart(Chart):
    """Training loss, its smoothed curve, eval loss and metric; a vertical mark at every policy change."""

    WATCHES = (Aspect.RUN, Aspect.PROGRESS, Aspect.EVALS, Aspect.POLICY, Aspect.METRICS)
    DEFAULT_CSS = """
    LossChart > #metric-filter { display: none; height: 1; border: none; padding: 0 1; }
    LossChart.-filtering > #metric-filter { display: block; }
    LossChart > #metric-matches { display: none; height: auto; max-height: 3; padding: 0 1; }
    LossChart.-filtered > #metric-matches { display: block; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._legend: str | None = None  # as last set (setting the border subtitle repaints, even to the same text)
        self.compared: list[ComparedRun] = []
        self.by_time = False
        self.pattern = ""
        self.filter_input = MetricFilter(
            placeholder="metric glob: eval.*, grad_norm.block*, sparsity.*  (esc: back to the losses)",
            id="metric-filter",
        )
        self.matches = Static(id="metric-matches")
        self._smooth: dict[int, tuple] = {}  # id(Points) -> (it, its smoothed values so far, the raw value of the last)

    def compose(self) -> ComposeResult:
        yield self.filter_input
        yield self.matches
        yield from super().compose()

    def _set_legend(self, legend: str) -> None:
        if legend != self._legend:
            self._legend = self.border_subtitle = legend

    def show(self, state: RunModel) -> None:
        self.set_class(bool(self.pattern), "-filtered")
        runs = [(state.metrics, COLORS[0])] + [
            (c.metrics, COLORS[(i + 1) % len(COLORS)]) for i, c in enumerate(self.compared)
        ]
        if self.pattern:
            self._show_metrics(runs)
        elif self.compared or self.by_time:
            self._show_runs(state, runs)
        else:
            self._show_own(state)

    def _show_own(self, state: RunModel) -> None:
        legend = (LOSS_LEGEND if self.size.width >= LEGEND_FROM else LOSS_LEGEND_SHORT).format(metric=state.metric)
        self._set_legend(COLLAPSED_MARK + legend if state.collapsed else legend)
        self.redraw(
            LineSpec(
                series=[
                    Series(state.loss_steps, state.loss, color="gray"),
                    Series(state.loss_steps, state.loss_smooth, color="cyan"),
                    Series(state.eval_steps, state.eval_loss, color="yellow", marker="hd"),
                    Series(state.eval_steps, state.eval_metric, color="green", right_axis=True, marker="hd"),
                ],
                marks=[(step, "magenta") for step in state.change_steps],
            )
        )

    def _show_runs(self, state: RunModel, runs: list[tuple[RunMetrics, str]]) -> None:
        """Every run in its own colour: smoothed train loss, eval loss, the task's metric (right axis), its policy changes."""
        series, marks = [], []
        smoothed: dict[int, tuple] = {}
        for metrics, color in runs:
            if loss := metrics.series.get("train.loss"):
                series.append(Series(metrics.x_of(loss, self.by_time), self._smoothed(loss, smoothed), color=color))
            if evals := metrics.series.get("eval.loss"):
                series.append(Series(metrics.x_of(evals, self.by_time), list(evals.values), color=color, marker="•"))
            if score := metrics.series.get(f"eval.{metrics.metric}"):
                series.append(
                    Series(
                        metrics.x_of(score, self.by_time), list(score.values), color=color, right_axis=True, marker="hd"
                    )
                )
            marks += [(x, color) for x in metrics.change_xs(self.by_time)]
        self._smooth = smoothed  # only the series on screen stay cached
        names = " ".join(f"[{color}]■ {metrics.name or state.run}[/]" for metrics, color in runs)
        self._set_legend(f"{names}  [gray]{COMPARE_KEY.format(metric=state.metric)}[/]")
        self.redraw(LineSpec(series=series, marks=marks, xlabel=self._xlabel))

    def _show_metrics(self, runs: list[tuple[RunMetrics, str]]) -> None:
        """Every metric whose name matches the filter, in every run shown, up to ``MAX_SERIES`` of them."""
        names = sorted({name for metrics, _ in runs for name in matching(metrics.metric_names, self.pattern)})
        pairs = [(metrics, name) for name in names for metrics, _ in runs if name in metrics.series]
        drawn = pairs[:MAX_SERIES]
        scaled = not _one_scale([metrics.series[name].values for metrics, name in drawn])
        series, legend = [], []
        for i, (metrics, name) in enumerate(drawn):
            color = COLORS[i % len(COLORS)]
            points = metrics.series[name]
            values, span = list(points.values), ""
            if scaled:  # mixed units (bytes beside percents): each series on its own 0-1 range, its range in the legend
                lo, hi = min(values), max(values)
                values = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in values]
                span = f" {lo:.3g}…{hi:.3g}"
            series.append(Series(metrics.x_of(points, self.by_time), values, color=color))
            legend.append(f"[{color}]■[/] {metrics.name + ':' if len(runs) > 1 else ''}{name}{span}")
        if not names:
            known = ", ".join(next(iter(runs))[0].metric_names[:6]) or "none yet"
            text = f"no metric matches [bold]{_escaped(self.pattern)}[/] (known: {known} …)"
        else:
            shown = f"showing {len(drawn)} of {len(pairs)}" if len(drawn) < len(pairs) else f"{len(pairs)} series"
            text = (
                f"{len(names)} metric{'s' if len(names) > 1 else ''} match [bold]{_escaped(self.pattern)}[/] · {shown}"
                + (" · each scaled to its own range (mixed units)" if scaled else "")
                + ": "
                + "  ".join(legend)
            )
        self.matches.update(text)
        self._set_legend(f"metrics matching {_escaped(self.pattern)} · [gray]esc: back to the losses[/]")
        self.redraw(LineSpec(series=series, xlabel=self._xlabel, empty="no metric matches"))

    @property
    def _xlabel(self) -> str:
        return "minutes since the run's start" if self.by_time else "step"

    def _smoothed(self, points: Points, drawn: dict[int, tuple]) -> list[float]:
        """The EMA of ``points``, extended by the points added since the last frame (a finished run's is computed once).

        Computed afresh when the series is not the one cached (a run read again) or was cut by a resume (the raw value
        its last smoothed point came from is no longer there)."""
        cached = self._smooth.get(id(points))
        done = cached[1] if cached is not None and cached[0] is points else []
        if len(done) > len(points) or (done and cached is not None and points.values[len(done) - 1] != cached[2]):
            done = []
        for v in points.values[len(done) :]:
            done.append(v if not done else SMOOTHING * done[-1] + (1 - SMOOTHING) * v)
        drawn[id(points)] = (points, done, points.values[len(done) - 1] if done else None)
        return list(done)


def _escaped(text: str) -> str:
    return text.replace("[", "\\[")


class SparsityChart(Chart):
    """The fraction of each unit's weights that pruning has removed: now, or at the end of an IMP round (``[`` ``]``)."""

    WATCHES = (Aspect.UNITS,)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round: int | None = None  # index into the run's IMP rounds; None: live
        self._subtitle: str | None = None

    def step_round(self, delta: int, state: RunModel) -> None:
        """Move to the round before (-1) or after (+1); past the last round is live, and before the first wraps to it."""
        count = len(state.imp_rounds)
        if not count:
            self.round = None
            return
        position = count if self.round is None else self.round  # live sits after the last round
        position = (position + delta) % (count + 1)
        self.round = None if position == count else position

    def show(self, state: RunModel) -> None:
        names = [u.name for u in state.units] if state.unit_stats or state.imp_rounds else []
        chosen = state.imp_rounds[self.round] if self.round is not None and self.round < len(state.imp_rounds) else None
        if chosen is None:  # live: each unit's pruned share of all its parameters
            values = [stats.sparsity if (stats := state.unit_stats.get(n)) else 0.0 for n in names]
            subtitle = "now · [gray]\\[ ] IMP rounds[/]" if state.imp_rounds else ""
        else:  # that round: each unit's pruned share of its pruning targets
            values = [1.0 - chosen.kept_by_unit.get(n, 1.0) for n in names]
            subtitle = f"IMP round {chosen.round}/{chosen.rounds} · {chosen.sparsity:.1%} [gray]\\[ ][/]"
        if subtitle != self._subtitle:
            self._subtitle = self.border_subtitle = subtitle
        self.redraw(BarSpec(labels=names, values=values))


def _one_scale(values: list[list[float]]) -> bool:
    """Can these series share one y axis? Not when their largest magnitudes are more than ONE_SCALE_SPREAD apart."""
    peaks = [p for p in (max((abs(v) for v in vs), default=0.0) for vs in values) if p > 0]
    return len(peaks) < 2 or max(peaks) / min(peaks) <= ONE_SCALE_SPREAD
