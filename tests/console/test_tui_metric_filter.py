"""The metric filter offers what the run measured, not the counters beside it (samples evaluated, batch size)."""

from __future__ import annotations

from spu_tui.app import SpuApp
from spu_tui.widgets.run_charts import LossChart
from support import ScriptedLink

HISTORY = [
    {"type": "hello", "t": 1.0, "state": "training", "step": 0, "total_steps": 4, "config": {}},
    *[
        {"type": "step", "t": 1.0 + s, "step": s, "loss": 1 / s, "samples": 8 * s, "batch_size": 8, "step_time": 0.5}
        for s in range(1, 5)
    ],
    {"type": "eval", "t": 6.0, "step": 4, "eval_loss": 0.5, "accuracy": 0.8, "eval_samples": 40},
    {"type": "system", "t": 7.0, "step": 4, "seconds": 2.0, "cpu_process": 90.0, "cpu_count": 2},
]


async def test_the_metric_filter_lists_metrics_not_counters(tmp_path):
    app = SpuApp(tmp_path / "run", history=HISTORY, link=ScriptedLink())
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("slash", *"eval.")
        await pilot.pause(0.2)
        chart = app.query_one(LossChart)
        matches = str(chart.matches.render())
        assert "2 metrics match eval." in matches and "eval.accuracy" in matches and "eval.loss" in matches
        assert "eval.samples" not in matches
        chart.filter_input.value = "nope"
        await pilot.pause(0.2)
        known = str(chart.matches.render())
        assert "train.loss" in known and "train.samples" not in known and "train.batch_size" not in known
    assert app.state.metrics.metric_names == [
        "eval.accuracy",
        "eval.loss",
        "system.cpu_process",
        "train.loss",
        "train.step_time",
    ]
