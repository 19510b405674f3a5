"""The run's plots: losses over steps (with the steps the policy changed at), and sparsity per unit."""

from __future__ import annotations

from ..run_state import Aspect, RunState
from .chart import BarSpec, Chart, LineSpec, Series
from .learning_view import short_unit

LOSS_LEGEND = "[gray]loss[/] [cyan]smoothed[/] [yellow]eval loss[/] [green]{metric} (right axis)[/] [magenta]│ policy change[/]"
LOSS_LEGEND_SHORT = "[gray]loss[/] [cyan]smooth[/] [yellow]eval[/] [green]{metric:.3}→[/] [magenta]│chg[/]"
LEGEND_FROM = 80  # columns from which the loss legend is written out


class LossChart(Chart):
    """Training loss, its smoothed curve, eval loss and metric; a vertical mark at every policy change."""

    WATCHES = (Aspect.RUN, Aspect.PROGRESS, Aspect.EVALS, Aspect.POLICY)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._legend: str | None = None  # as last set (setting the border subtitle repaints, even to the same text)

    def show(self, state: RunState) -> None:
        legend = (LOSS_LEGEND if self.size.width >= LEGEND_FROM else LOSS_LEGEND_SHORT).format(metric=state.metric)
        if legend != self._legend:
            self._legend = self.border_subtitle = legend
        self.redraw(
            LineSpec(
                series=[
                    Series(state.loss_steps, state.loss, color="gray"),
                    Series(state.loss_steps, state.loss_smooth, color="cyan"),
                    Series(state.eval_steps, state.eval_loss, color="yellow", marker="hd"),
                    Series(state.eval_steps, state.eval_metric, color="green", right_axis=True, marker="hd"),
                ],
                marks=state.change_steps,
            )
        )


class SparsityChart(Chart):
    """The fraction of each unit's weights that pruning has removed: now, or at the end of an IMP round (``[`` ``]``)."""

    WATCHES = (Aspect.UNITS,)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round: int | None = None  # index into the run's IMP rounds; None: live
        self._subtitle: str | None = None

    def step_round(self, delta: int, state: RunState) -> None:
        """Move to the round before (-1) or after (+1); past the last round is live, and before the first wraps to it."""
        count = len(state.imp_rounds)
        if not count:
            self.round = None
            return
        position = count if self.round is None else self.round  # live sits after the last round
        position = (position + delta) % (count + 1)
        self.round = None if position == count else position

    def show(self, state: RunState) -> None:
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
        self.redraw(BarSpec(labels=[short_unit(n) for n in names], values=values, ylim=(0.0, 1.0)))
