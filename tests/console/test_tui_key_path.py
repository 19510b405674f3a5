"""A key is answered in the next frame by its row's mark alone; the whole tree, the plots and the log follow at the
frame pace.  Issue 30: every key relabelled the whole tree and the engine's "received" drew every stale view (plots,
log and its layout) first, which tripled key -> received -> redraw.  Counted in calls, never in milliseconds."""

from __future__ import annotations

from collections import Counter

from spu_tui.app import SpuApp
from spu_tui.frames import COALESCE, KEY_FIRST, USER_TURN, FrameBudget
from spu_tui.widgets.chart import Chart
from spu_tui.widgets.log_panel import LogPanel
from spu_tui.widgets.run_charts import LossChart, SparsityChart
from spu_tui.widgets.unit_tree import Row, UnitTree
from support import ScriptedLink, scripted_hello, wait_for

UNITS = ["embeddings", "block0", "block1", "head"]
HELLO = scripted_hello(UNITS)
HEAVY = [  # the drawing a key must not wait for
    (UnitTree, "show"),
    (UnitTree, "relabel"),
    (Chart, "redraw"),
    (LossChart, "show"),
    (SparsityChart, "show"),
    (LogPanel, "show"),
]


def progress(step: int) -> list[dict]:
    """A step and its statistics: what the engine sends beside its answers while training."""
    stats = {"trainable": 1.0, "grad_norm": 0.1, "update_ratio": 0.01, "sparsity": 0.0}
    return [
        {"type": "step", "t": 1.0 + step, "step": step, "loss": 1.0 / step, "step_time": 0.5},
        {"type": "units", "t": 1.0 + step, "step": step, "units": dict.fromkeys(UNITS, stats)},
    ]


async def test_a_toggle_key_draws_its_mark_in_the_next_frame_without_a_full_redraw(tmp_path, monkeypatch):
    calls: Counter[str] = Counter()

    def count(cls: type, name: str) -> None:
        drawn = getattr(cls, name)

        def counted(self, *args, **kwargs):
            calls[f"{cls.__name__}.{name}"] += 1
            return drawn(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    for cls, name in HEAVY:
        count(cls, name)
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        link.deliver(HELLO, *progress(1))
        tree = app.query_one(UnitTree)
        await wait_for(pilot, lambda: Row("tensor", "block1.b") in tree.rows, "the tree's rows")
        tree.move_to(Row("tensor", "block1.b"))
        await pilot.pause(0.5)  # past the frame pace's fastest: the next frame is due at once
        assert calls["UnitTree.show"] and calls["LossChart.show"], "the first frame drew the tree and the plots"

        at_mark: dict = {}
        received_drawn = app.round_trips.received_drawn

        def mark_drawn(sent: float) -> None:  # called after the refresh that shows the mark
            at_mark.update(calls=Counter(calls), label=str(tree.cursor_node.label))
            received_drawn(sent)

        monkeypatch.setattr(app.round_trips, "received_drawn", mark_drawn)
        before = Counter(calls)
        await pilot.press("space")
        assert link.changes() == [{"freeze": [{"match": "block1.b", "trainable": False}]}]
        link.deliver(*progress(2))  # a frame is due: it waits for the mark (the engine's answer takes a while)
        await pilot.pause(0.2)
        link.deliver(*progress(3), {"type": "received", "t": 4.1, "id": "c1", "cmd": "change"})
        await wait_for(pilot, lambda: bool(at_mark), "the received mark drawn")
        assert "…" in at_mark["label"], "the row shows the engine has the change"
        assert at_mark["calls"] - before == Counter(), "no full tree, plot or log redraw before the key's mark"
        await wait_for(
            pilot, lambda: calls["LossChart.show"] > before["LossChart.show"], "the progress drawn at the frame pace"
        )
        assert calls["UnitTree.show"] > before["UnitTree.show"] and "…" in str(tree.cursor_node.label)


def test_a_frame_due_at_a_key_waits_for_the_keys_mark():
    budget = FrameBudget()
    assert budget.wait() == COALESCE, "nothing drawn yet: a frame is due at once"
    budget.key_pressed()
    assert budget.held and COALESCE < budget.wait() <= KEY_FIRST, "the received mark (milliseconds away) goes first"
    budget.marks_drawn()
    assert not budget.held and budget.wait() == COALESCE, "once the mark is drawn the frame keeps its own pace"


def test_progress_waits_a_beat_after_the_user_is_answered():
    """Someone toggling row after row presses the next key within a few hundred ms of seeing the answer: a
    whole-screen redraw started in that moment would make the key wait behind it."""
    budget = FrameBudget()
    budget.answered()
    assert COALESCE < budget.wait() <= USER_TURN
    budget.key_pressed()
    budget.marks_drawn()
    assert COALESCE < budget.wait() <= USER_TURN, "the next key's mark does not end the user's turn"
