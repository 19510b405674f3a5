"""Keys and focus: after adding or applying from a field the keys act again (a `p` pauses rather than typing "p"),
the key bar says how to leave a field, and a resize lays the screen out at once."""

from __future__ import annotations

from textual.widgets import Input

from spu_tui.app import SpuApp
from spu_tui.widgets import log_panel
from spu_tui.widgets.control_fields import FIELD_BY_ID
from spu_tui.widgets.key_bar import KeyBar
from spu_tui.widgets.log_panel import LogPanel
from spu_tui.widgets.method_section import MethodSection
from support import ScriptedLink, assert_inside, wait_for

TRIGGER = "at: {epoch: 2}, freeze: [{units: [embeddings], trainable: false}]"


async def submit(pilot, app, field_id: str, text: str) -> Input:
    field = app.query_one(f"#{field_id}", Input)
    field.focus()
    field.value = text
    await pilot.pause(0.1)
    await pilot.press("enter")
    await pilot.pause(0.1)
    return field


async def test_after_adding_a_trigger_p_pauses_instead_of_typing(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        field = await submit(pilot, app, "trigger-new", TRIGGER)
        assert link.sent[-1][0] == "schedule"
        assert not isinstance(app.focused, Input)
        await pilot.press("p")
        assert link.sent[-1] == ("pause", {})
        assert field.value == TRIGGER  # cleared by the engine's ack, never typed into


async def test_after_applying_a_learning_rate_rule_the_keys_act_again(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        field = await submit(pilot, app, "lr-rule-new", "layers: 0-1, scale: 0.5")
        assert link.sent[-1][0] == "change"
        await pilot.press("p")
        assert link.sent[-1] == ("pause", {}) and field.value == "layers: 0-1, scale: 0.5"


async def test_a_refused_entry_keeps_the_field_for_its_fix(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        field = await submit(pilot, app, "trigger-new", "at: {epoch: -1}")
        assert link.sent == [] and app.focused is field


async def test_the_key_bar_says_esc_leaves_a_field(tmp_path):
    app = SpuApp(tmp_path / "run", link=ScriptedLink())
    async with app.run_test(size=(120, 36)) as pilot:
        bar = app.query_one(KeyBar)
        assert "esc" not in str(bar.render())
        app.query_one("#trigger-new", Input).focus()
        await pilot.pause(0.1)
        assert "esc" in str(bar.render()) and "leave" in str(bar.render())
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert not isinstance(app.focused, Input) and "esc" not in str(bar.render())


async def test_a_burst_of_resizes_lays_out_at_once_and_rewraps_the_log_once(tmp_path, monkeypatch):
    """Re-wrapping a long log at every resize of a terminal being dragged kept the screen seconds behind: the layout
    follows each size at once, the log is wrapped once to the size the burst ends at."""
    monkeypatch.setattr(log_panel, "REWRAP_AFTER", 3.0)  # wider than any gap between the resizes below
    said = "a log line long enough to wrap at every width the console is drawn at, " * 2
    history = [{"type": "hello", "t": 1.0, "state": "training", "step": 0, "total_steps": 900, "config": {}}]
    history += [{"type": "log", "t": 1.0 + s, "step": s, "message": f"{s} {said}"} for s in range(300)]
    app = SpuApp(tmp_path / "run", history=history, link=ScriptedLink())
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.2)
        log = app.query_one(LogPanel)
        wrapped = []
        rewrap = log.rewrap
        log.rewrap = lambda: wrapped.append(log.scrollable_content_region.width) or rewrap()
        for size in ((190, 50), (175, 48), (165, 46)):  # every panel shown at each
            await pilot.resize_terminal(*size)
            assert app.screen.region.size == size
            assert_inside(app, "#header", "#tree", "#log", "#keys")
        final = log.scrollable_content_region.width
        await wait_for(pilot, lambda: log._width == final, "the re-wrap")
        assert wrapped == [final]
        assert max(line.cell_length for line in log.lines) <= final
        assert "299 a log line" in "".join(line.text for line in log.lines[-6:])


async def test_after_enter_in_a_method_field_the_focus_is_on_its_apply_button(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        section = app.query_one("#sec-lr", MethodSection)
        field = next(f for f in section.query(Input) if f.id in FIELD_BY_ID)
        typed = field.value
        await submit(pilot, app, field.id, typed)
        assert link.sent[-1][0] == "change" and app.focused is section.query_one("#apply-lr")
        await pilot.press("p")
        assert link.sent[-1] == ("pause", {}) and field.value == typed
