"""Console layout and input handling, fed with events recorded from a real (in-process) engine run.

No engine process here: the app replays a run's history, as ``spu-tui attach``
does for a finished run, so these tests are fast and deterministic.
"""

from __future__ import annotations

import random

import pytest
from typer.testing import CliRunner

from spu_engine.core.policy import Change, FreezeRule
from spu_tui.app import SpuApp
from spu_tui.frames import FASTEST, RECENT, SLOWEST, FrameBudget
from spu_tui.link import Inbox
from spu_tui.screens.help import HelpScreen
from spu_tui.screens.panels import PANELS
from spu_tui.widgets.chart import CellPlot, Chart
from spu_tui.widgets.controls import ControlsPanel
from spu_tui.widgets.run_header import RunHeader
from spu_tui.widgets.unit_tree import UnitTree
from support import SST2, ScriptedLink, assert_inside, record_run, screen_lines, type_into


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, tokenizer):
    """A finished 16-step tiny-BERT run that froze embeddings + block0 at step 8."""
    freeze = Change(freeze=[FreezeRule(units=["embeddings", "block0"], trainable=False)])
    return record_run(tmp_path_factory, tokenizer, "recorded", [(8, freeze)], steps=16, eval_every=8, stats_every=4)


@pytest.mark.parametrize("glue, metric", [("cola", "mcc"), ("mrpc", "f1")])
async def test_the_loss_plot_and_eval_lines_show_the_runs_own_metric(tmp_path_factory, tokenizer, glue, metric):
    from support import DATA

    data = tmp_path_factory.mktemp("data") / glue  # named like the GLUE task: its metric
    data.mkdir()
    for name, rows in (("train.tsv", 64), ("dev.tsv", 16)):
        (data / name).write_text(
            "".join((DATA / glue / name).read_text(encoding="utf-8").splitlines(keepends=True)[: rows + 1]),
            encoding="utf-8",
        )
    run_dir, history = record_run(tmp_path_factory, tokenizer, glue, [], data=data, steps=4, eval_every=2)
    evals = [e[metric] for e in history if e["type"] == "eval"]
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.5)
        assert app.state.metric == metric and app.state.eval_metric == evals and len(evals) == 2
        text = "\n".join(screen_lines(app))
        assert f"{metric} (right axis)" in text
        assert f"{metric} {evals[-1]:.4g}" in text and "accuracy" in text  # the eval line in the log


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
async def test_layout_fits_and_shows_the_run(recorded_run, size):
    run_dir, history = recorded_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.5)
        assert_inside(app, "#header", "#tree", "#keys", "#loss")
        lines = screen_lines(app)
        text = "\n".join(lines)
        assert "step 16/16" in text and "finished" in text
        assert "block0" in text and "head" in text
        assert lines[-1].rstrip().endswith("quit"), f"key bar cut off: {lines[-1]!r}"
        assert "frozen" in text  # embeddings and block0 were frozen at step 8
        if size[0] >= 200:
            assert_inside(app, "#sparsity", "#learning", "#controls", "#log")
        else:
            for i, (pid, _) in enumerate(PANELS):
                await pilot.press(str(i + 1))
                await pilot.pause(0.2)
                assert_inside(app, f"#{pid}")
                assert all(not app.query_one(f"#{other}").display for other, _ in PANELS if other != pid)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        assert isinstance(app.screen, HelpScreen)
        assert_inside(app, "#help-box")
        help_text = "\n".join(screen_lines(app))
        assert "freeze the cursor's unit" in help_text
        await pilot.press("escape")


async def test_policy_change_mark_and_log(recorded_run):
    run_dir, history = recorded_run
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        assert app.state.change_steps == [8]
        assert app.state.unit_trainable["block0"] == 0.0 and app.state.unit_trainable["block1"] == 1.0
        logged = [
            line.text for line in app.state.log if line.step == 8
        ]  # the panel may scroll it away (collapse notes)
        assert any("freeze embeddings, block0 (timeline)" in text for text in logged), logged


async def test_inputs_validate_as_you_type_with_the_policy_ranges(recorded_run):
    run_dir, history = recorded_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        status = app.query_one("#status-selective_backprop")
        await type_into(pilot, app, "sb-keep", "1.5")
        assert "keep: 1.5 is out of range; allowed 0.0 < keep <= 1.0" in str(status.render())
        assert status.has_class("-error")
        await pilot.press("enter")  # refused here: nothing is sent
        assert link.changes() == []
        await type_into(pilot, app, "sb-keep", "x")
        assert "keep: 'x' is not a number" in str(status.render())
        await type_into(pilot, app, "wus-patience", "1.5")
        assert "patience: '1.5' is not a whole number; allowed 1 <= patience" in str(
            app.query_one("#status-weight_update_skipping").render()
        )
        await type_into(pilot, app, "pr-start", "50")
        await type_into(pilot, app, "pr-end", "5")
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert "end_step (5) must be >= start_step (50)" in str(app.query_one("#status-pruning").render())
        assert app.query_one(ControlsPanel).engine_values["sb-keep"] == "0.5"


async def test_tree_keys_ask_for_the_right_rules(recorded_run):
    run_dir, history = recorded_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        await pilot.press("down", "down", "space")  # block1: trainable -> freeze
        await pilot.press("f")  # freeze embeddings .. block1
        await pilot.press("u")  # unfreeze block2 .. head
        await pilot.press("up", "space")  # block0 is frozen -> unfreeze
        await pilot.press("down", "right", "down", "space")  # first tensor of block1
    asked = [change["freeze"] for change in link.changes()]
    assert asked[0] == [{"units": ["block1"], "trainable": False}]
    assert asked[1] == [{"units": ["embeddings", "block0", "block1"], "trainable": False}]
    assert asked[2] == [{"units": ["block2", "block3", "head"], "trainable": True}]
    assert asked[3] == [{"units": ["block0"], "trainable": True}]
    assert asked[4][0]["match"].startswith("bert.encoder.layer.1.") and asked[4][0]["trainable"] is False


async def test_a_change_shows_sent_then_queued_until_the_ack_and_refusals_show_in_red(recorded_run):
    run_dir, history = recorded_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        tree = app.query_one(UnitTree)
        await pilot.pause(0.2)
        await pilot.press("down", "down", "space")  # block1
        assert link.sent[-1] == ("change", {"change": {"freeze": [{"units": ["block1"], "trainable": False}]}})
        label = str(tree.get_node_at_line(2).label)
        assert "·" in label and "…" not in label, "the row shows the change is on its way"
        t = max(e.get("t", 0) for e in history) + 1
        link.deliver({"type": "received", "t": t, "id": "c1", "cmd": "change"})
        await pilot.pause(0.2)
        label = str(tree.get_node_at_line(2).label)
        assert "…" in label and "·" not in label, "the engine has it: queued for the next boundary"
        assert len(app.round_trips.received) == 1 and app.commands.in_flight
        link.deliver({"type": "ack", "t": t, "id": "c1", "cmd": "change", "step": 17, "ok": True, "message": ""})
        await pilot.pause(0.2)
        label = str(tree.get_node_at_line(2).label)
        assert "…" not in label and "·" not in label and not app.commands.in_flight

        app.query_one("#pr-method").value = "magnitude"
        await pilot.pause(0.2)
        cmd, fields = link.sent[-1]  # first the what-if: nothing is applied yet
        assert cmd == "preview" and fields["change"]["set"]["pruning"]["method"] == "magnitude"
        assert str(app.query_one("#status-pruning").render()).startswith("edited")
        link.deliver(
            {
                "type": "preview",
                "t": t + 0.2,
                "id": "c2",
                "trainable": 900,
                "total": 1000,
                "trainable_now": 1000,
                "backward": 1.0,
                "frozen_prefix_backward": 1.0,
                "sparsity": 0.5,
                "notes": [],
            }
        )
        await pilot.pause(0.2)
        whatif = str(app.query_one("#whatif-pruning").render())
        assert "trainable 1.0k → 900 (90.0%)" in whatif and "sparsity → 50%" in whatif
        app.query_one("#apply-pruning").press()
        await pilot.pause(0.2)
        cmd, fields = link.sent[-1]
        assert cmd == "change" and fields["change"]["set"]["pruning"]["method"] == "magnitude"
        assert (
            fields["change"]["set"]["pruning"]["structure"] == "weights"
        )  # every pruning control goes with the change
        assert str(app.query_one("#status-pruning").render()) == "sent: Pruning"
        link.deliver({"type": "received", "t": t + 0.5, "id": "c3", "cmd": "change"})
        await pilot.pause(0.2)
        assert str(app.query_one("#status-pruning").render()) == "queued: Pruning applies at the next step boundary"
        refusal = "pruning.targets[0]: pattern '*.qkv.weight' matches no parameter of this model"
        link.deliver(
            {"type": "ack", "t": t + 1, "id": "c3", "cmd": "change", "step": 17, "ok": False, "message": refusal},
            {"type": "error", "t": t + 2, "id": "c3", "step": 17, "message": refusal},
        )
        await pilot.pause(0.3)
        status = app.query_one("#status-pruning")
        assert str(status.render()) == f"refused: {refusal}" and status.has_class("-error")
        assert str(app.query_one("#pr-method").value) == "none", "the field shows the engine's value again"
        assert app.state.log[-1].error and app.state.log[-1].text == refusal
        assert not app.commands.in_flight
        await pilot.press("down", "space")  # the console keeps working after a refusal
        assert link.sent[-1][1]["change"]["freeze"] == [{"units": ["block2"], "trainable": False}]


def test_frames_are_spaced_by_what_they_cost():
    budget = FrameBudget(share=0.02)
    assert budget.interval == FASTEST, "nothing measured yet: the fastest rate"
    budget.spent(0.01, 0.5)
    assert budget.interval == pytest.approx(0.5), "10 ms of CPU per frame at 2 % of a core: two frames a second"
    budget.spent(0.03, 0.5)
    assert budget.balance == pytest.approx(-0.02) and budget.interval == pytest.approx(1.2), (
        "a costly frame is paid back: the next frames wait for a frame's cost (20 ms) and a fifth of the debt"
    )
    budget.spent(0.02, 10.0)
    assert budget.balance == pytest.approx(budget.cost) and budget.interval == pytest.approx(0.8), (
        "a quiet spell earns one frame's credit, no more"
    )
    for _ in range(RECENT):
        budget.spent(1.0, 1.0)
    assert budget.interval == SLOWEST and budget.balance == pytest.approx(-0.02 * SLOWEST), (
        "a console that cannot keep its share draws every SLOWEST seconds; the debt stops at one such wait"
    )


@pytest.mark.parametrize("seed", range(3))
def test_watching_holds_the_share_over_any_stretch(seed):
    """Frames of uneven cost (a plot every few, unit statistics every tenth), drawn when due or at the next event:
    over any stretch of frames the CPU spent stays within the share, give or take one frame (40 ms)."""
    rng = random.Random(seed)
    budget, now, spent = FrameBudget(share=0.015), 0.0, [(0.0, 0.0)]
    for k in range(400):
        cost = rng.uniform(0.005, 0.03) + (0.05 if k % 10 == 0 else 0.0)
        wait = budget.interval + rng.choice([0.0, 0.0, rng.uniform(0, 1.2)])  # the next event may come later
        budget.spent(cost, wait)
        now += wait
        spent.append((now, spent[-1][1] + cost))
    for (t0, c0), (t1, c1) in [(spent[i], spent[j]) for i in range(0, 380, 7) for j in (i + 20, len(spent) - 1)]:
        assert c1 - c0 <= 0.015 * (t1 - t0) + 0.04, f"frames {t0:.1f}..{t1:.1f} s spent {c1 - c0:.3f} s"


async def test_training_progress_waits_for_the_next_frame_and_answers_do_not(recorded_run, monkeypatch):
    run_dir, history = recorded_run
    paints, redraws = [], []
    monkeypatch.setattr(CellPlot, "_paint", lambda self, paint=CellPlot._paint: paints.append(self) or paint(self))
    monkeypatch.setattr(
        Chart, "redraw", lambda self, spec, redraw=Chart.redraw: redraws.append(self) or redraw(self, spec)
    )
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        header = app.query_one(RunHeader)
        app.frames.costs.extend([1.0] * RECENT)  # costly frames: the next one waits SLOWEST seconds
        await pilot.pause(0.2)
        t = max(e.get("t", 0) for e in history) + 1
        step = {"type": "step", "loss": 0.5, "step_time": 0.5, "samples_per_s": 64.0}
        link.deliver({**step, "t": t, "step": 17})
        await pilot.pause(0.3)
        assert header.step == 17, "the first frame of progress is due at once"
        link.deliver({**step, "t": t + 1, "step": 18})
        await pilot.pause(0.3)
        assert header.step == 17 and header in app.screen.stale_views(), "the next one waits for the budget"
        await pilot.press("down", "down", "space")
        tree = app.query_one(UnitTree)
        assert "·" in str(tree.get_node_at_line(2).label)
        link.deliver({"type": "ack", "t": t + 2, "id": "c1", "cmd": "change", "step": 18, "ok": True, "message": ""})
        await pilot.pause(0.2)
        assert "·" not in str(tree.get_node_at_line(2).label), "the engine's answer is drawn at once, on its row"
        assert header.step == 17 and header in app.screen.stale_views(), (
            "what waited for the budget still waits: an answer draws what it changed, not every stale view"
        )
        await pilot.press("1")  # a frame now
        await pilot.pause(0.2)
        assert header.step == 18 and not app.screen.stale_views()
        painted, redrawn = len(paints), len(redraws)
        link.deliver(
            {"type": "state", "t": t + 3, "state": "paused", "step": 18}
        )  # the loss plot's legend watches the run
        await pilot.pause(0.1)
        await pilot.press("1")  # a frame now
        await pilot.pause(0.2)
        assert header.state == "paused" and len(redraws) > redrawn, "the loss plot was handed its data again"
        assert len(paints) == painted, "the same data again costs no repaint"


def test_ui_cpu_budget_from_the_flag_or_the_environment(recorded_run, monkeypatch):
    from spu_tui.cli import app

    run_dir, _ = recorded_run
    shares = []
    monkeypatch.setattr(SpuApp, "run", lambda self: shares.append(self.frames.share))
    assert CliRunner().invoke(app, ["attach", str(run_dir), "--ui-cpu", "4"]).exit_code == 0
    assert CliRunner().invoke(app, ["attach", str(run_dir)], env={"SPU_TUI_CPU": "0.5"}).exit_code == 0
    assert shares == [pytest.approx(0.04), pytest.approx(0.005)]
    result = CliRunner().invoke(app, ["attach", str(run_dir), "--ui-cpu", "0"])
    assert result.exit_code == 2 and "--ui-cpu" in result.output


def test_no_data_reachable_says_what_to_pass(monkeypatch):
    from spu_tui.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SPU_DATA", raising=False)
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "--data" in result.output and "SPU_DATA" in result.output and "train.tsv" in result.output


def test_bad_data_path_is_named_before_the_ui(monkeypatch, tmp_path):
    from spu_tui.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["--data", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "--data" in result.output and "does not exist" in result.output


def test_attach_without_live_run_says_so(monkeypatch, tmp_path):
    from spu_tui.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["attach"])
    assert result.exit_code == 2 and "no live run" in result.output


def test_engine_events_coalesce_into_one_wake_up():
    """The reader thread posts one message for a burst of events; the UI drains them all at once."""
    from spu_tui.link import EventsArrived

    class Target:
        def __init__(self) -> None:
            self.posted: list = []

        def post_message(self, message) -> bool:
            self.posted.append(message)
            return True

    target = Target()
    inbox = Inbox(target)
    for step in range(500):
        inbox.put({"type": "step", "step": step})
    assert len(target.posted) == 1 and isinstance(target.posted[0], EventsArrived)
    assert [e["step"] for e in inbox.drain()] == list(range(500))
    inbox.put({"type": "step", "step": 500})
    assert len(target.posted) == 2, "after a drain the next event wakes the UI again"


@pytest.mark.parametrize("key, checkpoint", [("n", False), ("c", True)])
async def test_quit_dialog_stops_the_engine_and_leaves_on_its_ack(recorded_run, key, checkpoint):
    run_dir, history = recorded_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        link.deliver({"type": "state", "t": 2e9, "state": "training", "step": 16})
        await pilot.pause(0.1)
        await pilot.press("q")
        await pilot.pause(0.2)
        assert_inside(app, "#quit-box")
        await pilot.press(key)
        await pilot.pause(0.2)
        assert link.sent[-1] == ("stop", {"checkpoint": checkpoint})
        assert app.is_running, "the console waits for the engine's answer"
        link.deliver(
            {"type": "ack", "t": 2e9, "id": f"c{len(link.sent)}", "cmd": "stop", "step": 17, "ok": True, "message": ""}
        )
        await pilot.pause(0.3)
        assert not app.is_running


async def test_a_refused_stop_keeps_the_console_open(recorded_run):
    run_dir, history = recorded_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        link.deliver({"type": "state", "t": 2e9, "state": "training", "step": 16})
        await pilot.pause(0.1)
        await pilot.press("q", "c")
        await pilot.pause(0.2)
        message = "checkpoint could not be written: disk full; training goes on"
        link.deliver({"type": "ack", "t": 2e9, "id": "c1", "cmd": "stop", "step": 17, "ok": False, "message": message})
        await pilot.pause(0.3)
        assert app.is_running
        assert app.state.log[-1].error and message in app.state.log[-1].text


async def test_rules_listed_and_removed_undo_key_and_errors_that_clear(recorded_run):
    run_dir, history = recorded_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.2)
        rules = app.query_one("#rules")
        assert "0: freeze embeddings, block0" in str(rules.children[0].query_one("Static").render())
        assert str(app.query_one("#now-weight_update_skipping").render()) == "off; first phase when on: full"
        rules.focus()
        await pilot.press("x")
        assert link.sent[-1] == ("change", {"change": {"set": {"freeze": []}}})
        assert str(app.query_one("#status-freeze").render()) == "sent: freeze rules"

        await pilot.press("escape", "z")
        assert link.sent[-1] == ("undo", {})
        t = max(e.get("t", 0) for e in history) + 1
        link.deliver(
            {
                "type": "ack",
                "t": t,
                "id": f"c{len(link.sent)}",
                "cmd": "undo",
                "step": 17,
                "ok": False,
                "message": "undo: nothing to undo",
            }
        )
        await pilot.pause(0.2)
        assert app.state.log[-1].error and "undo refused: undo: nothing to undo" in app.state.log[-1].text

        keep = app.query_one("#sb-keep")
        keep.focus()
        keep.value = "2"
        await pilot.pause(0.1)
        assert str(app.query_one("#status-selective_backprop").render()).startswith("keep: 2.0 is out of range")
        keep.value = "0.5"  # back to the engine's value, in one go
        await pilot.pause(0.1)
        assert str(app.query_one("#status-selective_backprop").render()) == ""


async def test_export_over_an_existing_file_is_sent_only_after_a_second_enter(recorded_run, tmp_path):
    run_dir, history = recorded_run
    existing = run_dir / "policy-export.yaml"  # the dialog's default path
    existing.write_text("mine\n")
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("e")
            await pilot.pause(0.2)
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert link.sent == [] and "exists: enter again replaces it" in str(
                app.screen.query_one("#export-error").render()
            )
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert link.sent == [("export", {"path": str(existing.resolve()), "overwrite": True})]
    finally:
        existing.unlink()


def test_spu_tui_starts_an_exported_policy_with_its_run_settings(monkeypatch, tmp_path, tiny_model_dir):
    """`spu-tui --policy export.yaml` alone: the run: section gives model, data and settings; a flag overrides one."""
    from types import SimpleNamespace

    import spu_engine.core.spawn
    import spu_tui.app
    from spu_tui.cli import app

    started = {}
    monkeypatch.setattr(
        spu_engine.core.spawn,
        "spawn_engine",
        lambda config, policy, run_dir: started.update(config=config) or SimpleNamespace(poll=lambda: None),
    )
    monkeypatch.setattr(spu_tui.app.SpuApp, "run", lambda self: None)
    policy = tmp_path / "export.yaml"
    policy.write_text(f"run: {{model: {tiny_model_dir}, data: {SST2}, steps: 77, lr: 0.001, seed: 5}}\n")
    result = CliRunner().invoke(app, ["--policy", str(policy), "--seed", "6", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    config = started["config"]
    assert (config.model, config.data, config.steps, config.lr, config.seed) == (
        str(tiny_model_dir),
        str(SST2),
        77,
        0.001,
        6,
    )
    assert "--seed 5 -> 6" in result.output


def test_the_console_entry_point_loads_no_torch():
    """spu-tui draws its first frame without torch, transformers or datasets: they live in the engine process."""
    import subprocess
    import sys

    code = "import sys, spu_tui.cli, spu_tui.app; print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
