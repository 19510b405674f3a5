"""Runs side by side, the run browser, the metric filter, saved plots and the 120-column layout.

Two finished tiny-BERT runs under one folder, drawn from their events.jsonl as
``spu-tui attach`` draws a finished run: no engine process, nothing written.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from spu_engine.core.policy import Change, FreezeRule
from spu_engine.core.run_metrics import RunMetrics, flatten, matching
from spu_engine.core.runs import EVENTS, read_history
from spu_tui.app import RunsApp, SpuApp
from spu_tui.compare import COLORS, ComparedRun
from spu_tui.screens.panels import FOLLOW_EVERY
from spu_tui.screens.runs import RunsChoice, RunsScreen
from spu_tui.widgets.run_charts import MAX_SERIES, LossChart
from support import assert_inside, record_run, screen_lines


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tokenizer):
    """``alpha`` (16 steps, embeddings + block0 frozen at step 8) and ``beta`` (12 steps, another lr) under one folder."""
    root = tmp_path_factory.mktemp("runs")
    freeze = Change(freeze=[FreezeRule(units=["embeddings", "block0"], trainable=False)])
    made = {}
    for name, timeline, config in (
        ("alpha", [(8, freeze)], {"steps": 16, "eval_every": 8, "stats_every": 4}),
        ("beta", [], {"steps": 12, "eval_every": 6, "stats_every": 4, "lr": 3e-3}),
    ):
        run_dir, _ = record_run(tmp_path_factory, tokenizer, name, timeline, **config)
        made[name] = shutil.move(str(run_dir), root / name)
    return root, root / "alpha", root / "beta"


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_event_fields_flatten_to_dotted_metric_names():
    assert flatten(
        {
            "type": "step",
            "step": 3,
            "t": 1.0,
            "loss": 0.5,
            "lr": 1e-4,
            "sb_kept_fraction": 0.5,
            "pruning": {"sparsity": 0.2, "units": {"block0": 0.1}},
            "method": "x",
        }
    ) == {
        "train.loss": 0.5,
        "lr": 1e-4,
        "train.sb_kept_fraction": 0.5,
        "pruning.sparsity": 0.2,
        "pruning.units.block0": 0.1,
    }
    assert flatten({"type": "eval", "step": 3, "eval_loss": 0.7, "accuracy": 0.8, "eval_samples": 40}) == {
        "eval.loss": 0.7,
        "eval.accuracy": 0.8,
        "eval.samples": 40.0,
    }
    units = flatten(
        {
            "type": "units",
            "step": 4,
            "units": {"block3": {"grad_norm": 0.1, "trainable": 1.0}},
            "tensors": {"b.3.w": {"sparsity": 0.5, "trainable": True}},
        }
    )
    assert units == {
        "grad_norm.block3": 0.1,
        "trainable.block3": 1.0,
        "sparsity.b.3.w": 0.5,
    }  # a bool is no measurement
    # a kind this code has never heard of shows under its own name, without code changes
    assert flatten({"type": "system", "step": 5, "cpu_percent": 80.0, "gpu": {"0": {"util": 0.5}}, "host": "a"}) == {
        "system.cpu_percent": 80.0,
        "system.gpu.0.util": 0.5,
    }
    assert (
        flatten({"type": "policy", "step": 1, "trainable": 5}) == {}
        and flatten({"type": "step", "loss": float("nan")}) == {}
    )
    names = ["train.loss", "eval.loss", "eval.accuracy", "grad_norm.block0", "grad_norm.block1", "lr"]
    assert matching(names, "grad_norm.*") == ["grad_norm.block0", "grad_norm.block1"]
    assert matching(names, "loss") == ["train.loss", "eval.loss"]  # no wildcard: anywhere in the name
    assert matching(names, "eval.[a]*") == ["eval.accuracy"] and matching(names, "nope*") == []


def test_a_resume_drops_what_the_killed_engine_logged_past_its_checkpoint():
    m = RunMetrics("r")
    for step in range(1, 7):
        m.add({"type": "step", "t": float(step), "step": step, "loss": 1.0 / step})
    m.add({"type": "policy", "t": 5.5, "step": 5, "change": {"freeze": [{"units": ["head"], "trainable": False}]}})
    m.add({"type": "resumed", "t": 9.0, "step": 4})
    m.add({"type": "step", "t": 10.0, "step": 5, "loss": 0.3})
    assert list(m.series["train.loss"].steps) == [1, 2, 3, 4, 5] and m.last("train.loss") == 0.3
    assert m.changes == [] and m.best("train.loss") == (0.25, 4)


def test_a_compared_run_is_followed_by_offset_and_never_written(two_runs, tmp_path):
    _, _, beta = two_runs
    copy = tmp_path / "beta"
    shutil.copytree(beta, copy)
    lines = (copy / EVENTS).read_bytes().splitlines(keepends=True)
    (copy / EVENTS).write_bytes(b"".join(lines[:-5]))
    before = mtimes(copy)
    run = ComparedRun(copy)
    assert run.add(run.new_events()) and run.new_events() == []  # nothing new: a stat, no read
    steps = len(run.metrics.series["train.loss"])
    with (copy / EVENTS).open("ab") as f:
        f.write(b"".join(lines[-5:]) + b'{"type": "step", "step": 99, "lo')  # the engine is writing its next line
    grown = run.new_events()
    assert len(grown) == 5 and run.add(grown) and run.metrics.state == "finished"
    assert len(run.metrics.series["train.loss"]) == steps + sum(b'"type":"step"' in line for line in lines[-5:])
    assert run.new_events() == []  # the line being written waits until it is whole
    assert {p: t for p, t in mtimes(copy).items() if p.name != EVENTS} == {
        p: t for p, t in before.items() if p.name != EVENTS
    }


async def test_the_compare_overlay_draws_both_runs_with_a_legend_and_saves_the_plot(two_runs, monkeypatch, tmp_path):
    _, alpha, beta = two_runs
    monkeypatch.chdir(tmp_path)
    before = mtimes(beta)
    app = SpuApp(alpha, history=read_history(alpha), connect=False, compare=[beta])
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause(0.8)
        chart = app.query_one(LossChart)
        drawn = chart._shown
        colors = {s.color for s in drawn.series if s.x}
        assert {COLORS[0], COLORS[1]} <= colors, "both runs' series reach the plot"
        assert max(x for s in drawn.series if s.color == COLORS[1] for x in s.x) == 12  # beta's last step
        assert max(x for s in drawn.series if s.color == COLORS[0] for x in s.x) == 16
        assert (8.0, COLORS[0]) in drawn.marks, "alpha's policy change, in alpha's colour"
        legend = str(chart.border_subtitle)
        assert "alpha" in legend and "beta" in legend
        assert chart.plot.size.width >= 70, f"the loss plot at 120x36 is {chart.plot.size.width} columns"
        assert_inside(app, "#tree", "#loss", "#keys")  # below 160x45 the panels show one at a time
        await pilot.press("w")  # wall time on the x axis
        await pilot.pause(0.3)
        assert chart._shown.xlabel.startswith("minutes") and max(max(s.x) for s in chart._shown.series if s.x) < 10
        await pilot.press("w")
        await pilot.pause(0.3)
        app.save_screenshot(filename="compare-120x36.svg", path=str(tmp_path))
        await pilot.press("g")
        await pilot.pause(0.2)
        saved = tmp_path / "alpha-loss-step16.svg"
        assert ET.parse(saved).getroot().tag.endswith("svg")
        assert "saved the loss plot" in app.state.log[-1].text
    assert mtimes(beta) == before, "the compared run was only read"


async def test_the_metric_filter_narrows_by_glob_caps_the_series_and_says_when_nothing_matches(two_runs):
    _, alpha, _ = two_runs
    app = SpuApp(alpha, history=read_history(alpha), connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("3", "slash")  # from another panel: the loss panel comes up with the filter
        chart = app.query_one(LossChart)
        assert app.focused is chart.filter_input and chart.display
        await pilot.press(*"grad_norm.*")
        await pilot.pause(0.3)
        matches = str(chart.matches.render())
        assert (
            "6 metrics match grad_norm.*" in matches and "grad_norm.block0" in matches and "grad_norm.head" in matches
        )
        assert len(chart._shown.series) == 6
        chart.filter_input.value = "sparsity.*"  # every unit and every tensor: more than one plot can hold
        await pilot.pause(0.3)
        total = len(matching(app.state.metrics.names, "sparsity.*"))
        assert total > MAX_SERIES and f"showing {MAX_SERIES} of {total}" in str(chart.matches.render())
        assert len(chart._shown.series) == MAX_SERIES
        chart.filter_input.value = "nope*"
        await pilot.pause(0.3)
        assert "no metric matches nope*" in str(chart.matches.render()) and chart._shown.series == []
        assert any("no metric matches" in line for line in screen_lines(app))
        chart.filter_input.value = "eval.accuracy"
        await pilot.press("enter")  # keeps the filter, back to the tree
        await pilot.pause(0.2)
        assert app.focused is not chart.filter_input and len(chart._shown.series) == 1
        await pilot.press("slash", "escape")  # esc clears it: the losses again
        await pilot.pause(0.3)
        assert chart.pattern == "" and len(chart._shown.series) == 4


async def test_the_run_browser_lists_final_metrics_and_opens_a_finished_run_read_only(two_runs):
    _root, alpha, beta = two_runs
    before = {run: mtimes(run) for run in (alpha, beta)}
    app = SpuApp(alpha, history=read_history(alpha), connect=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("b")
        await pilot.pause(0.6)
        screen = app.screen
        assert isinstance(screen, RunsScreen) and len(screen.rows) == 2
        text = "\n".join(screen_lines(app))
        final = {run: [e for e in read_history(run) if e["type"] == "eval"][-1]["accuracy"] for run in (alpha, beta)}
        assert "alpha" in text and "beta" in text and "finished" in text and "16/16" in text and "12/12" in text
        assert f"accuracy {final[alpha]:.4f}" in text and f"accuracy {final[beta]:.4f}" in text
        assert "2 freeze rules" not in text and "1 freeze rule" in text and "full fine-tuning" in text
        app.save_screenshot(filename="runs-120x36.svg", path=str(alpha.parent.parent))
        await pilot.press("o", "o", "o")  # sorted by steps, most first
        assert [screen.table.get_row_at(i)[1] for i in range(2)] == ["alpha", "beta"]
        row = next(i for i in range(2) if screen.table.get_row_at(i)[1] == "beta")
        screen.table.move_cursor(row=row)
        await pilot.press("enter")
        await pilot.pause(0.6)
        assert app.run_dir == beta and app.link is None and app.engine is None
        assert app.state.step == 12 and app.state.state == "finished"
        assert "step 12/12" in "\n".join(screen_lines(app))
        await pilot.press("c")  # mark alpha to compare with beta
        await pilot.pause(0.6)
        screen = app.screen
        row = next(i for i in range(2) if screen.table.get_row_at(i)[1] == "alpha")
        screen.table.move_cursor(row=row)
        await pilot.press("space", "escape")
        await pilot.pause(0.6)
        assert [c.name for c in app.compared] == ["alpha"]
        assert "alpha" in str(app.screen.query_one(LossChart).border_subtitle)
    assert {run: mtimes(run) for run in (alpha, beta)} == before, "browsing and opening runs writes nothing"


def test_compare_and_runs_refuse_a_folder_that_is_no_run_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from spu_tui.cli import app

    result = CliRunner().invoke(app, ["attach", str(tmp_path), "--compare", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "--compare" in result.output and "not a run folder" in result.output
    runs = CliRunner().invoke(app, ["runs", str(tmp_path / "missing")])
    assert runs.exit_code == 2 and "no such folder" in runs.output


async def test_a_compared_run_that_grows_is_followed_on_the_plot(two_runs, tmp_path):
    _, alpha, beta = two_runs
    growing = tmp_path / "beta"
    shutil.copytree(beta, growing)
    lines = (growing / EVENTS).read_bytes().splitlines(keepends=True)
    cut = next(i for i, ev in enumerate(map(json.loads, lines)) if ev["type"] == "step" and ev["step"] == 6) + 1
    (growing / EVENTS).write_bytes(b"".join(lines[:cut]))
    app = SpuApp(alpha, history=read_history(alpha), connect=False, compare=[growing])
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause(0.8)
        chart = app.query_one(LossChart)

        def last_step() -> float:
            return max(x for s in chart._shown.series if s.color == COLORS[1] for x in s.x)

        assert last_step() == 6
        with (growing / EVENTS).open("ab") as f:
            f.write(b"".join(lines[cut:]))  # the run trains on
        await pilot.pause(FOLLOW_EVERY + 1.0)
        assert last_step() == 12


async def test_spu_tui_runs_hands_back_the_run_to_open_and_the_runs_to_compare(two_runs):
    root, alpha, beta = two_runs
    app = RunsApp(root)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause(0.6)
        screen = app.screen
        assert isinstance(screen, RunsScreen)
        rows = {screen.table.get_row_at(i)[1]: i for i in range(2)}
        screen.table.move_cursor(row=rows["beta"])
        await pilot.press("space")
        screen.table.move_cursor(row=rows["alpha"])
        await pilot.press("enter")
        await pilot.pause(0.3)
    assert app.return_value == RunsChoice(alpha.resolve(), [beta.resolve()])


def test_series_of_mixed_units_get_a_range_each_and_alike_ones_share_the_axis():
    from spu_tui.widgets.run_charts import _one_scale

    assert _one_scale([[0.7, 0.5], [0.9, 1.2]])  # losses beside losses: one axis
    assert _one_scale([[3.0], [0.0, 0.0]])  # an all-zero series fits any axis
    assert not _one_scale([[2.5e10, 2.5e10], [35.0, 80.0]])  # bytes beside percents: each its own range
