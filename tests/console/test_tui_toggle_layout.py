"""Toggling a tensor again and again never lays the console out again (issue 30).

Each toggle used to append a freeze rule the engine kept forever (32 toggles, 32 rules), the rules list was
rebuilt item by item at every policy event, and every status line's new word laid out all ~280 widgets: about
two whole-screen layouts a toggle, most of the console's CPU while toggling.  Counted in layouts, never in
milliseconds."""

from __future__ import annotations

from textual.widgets import Static

from spu_engine.core.policy import Change, FreezeRule, Policy
from spu_tui.app import SpuApp
from spu_tui.widgets.controls import ControlsPanel
from spu_tui.widgets.removable_list import RemovableItem
from spu_tui.widgets.unit_tree import Row, UnitTree
from support import ScriptedLink, scripted_hello, wait_for

UNITS = ["embeddings", "block0", "block1", "head"]
HELLO = scripted_hello(UNITS, policy=Policy().model_dump(mode="json"))


def answer(policy: Policy, cid: str, step: int, trainable: bool) -> tuple[Policy, list[dict]]:
    """The engine's events for one toggle of ``block1.b``: received, the policy in force, the ack."""
    policy = policy.apply(Change(freeze=[FreezeRule(match="block1.b", trainable=trainable)]))
    return policy, [
        {"type": "received", "t": 1.0 + step, "id": cid, "cmd": "change", "step": step},
        {
            "type": "policy",
            "t": 1.0 + step,
            "step": step,
            "source": "console",
            "change": {"freeze": [{"match": "block1.b", "trainable": trainable}]},
            "policy": policy.model_dump(mode="json"),
            "frozen_tensors": [] if trainable else ["block1.b"],
        },
        {"type": "ack", "t": 1.0 + step, "id": cid, "cmd": "change", "ok": True, "step": step},
        {"type": "step", "t": 1.0 + step, "step": step, "loss": 1.0 / step, "step_time": 0.5},
    ]


async def test_toggling_one_tensor_keeps_one_rule_and_lays_nothing_out(tmp_path):
    link = ScriptedLink()
    app = SpuApp(tmp_path / "run", link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        link.deliver(HELLO)
        tree = app.query_one(UnitTree)
        await wait_for(pilot, lambda: Row("tensor", "block1.b") in tree.rows, "the tree's rows")
        tree.focus()
        tree.move_to(Row("tensor", "block1.b"))
        policy = Policy()
        layouts: list[int] = []
        lay_out = app.screen._refresh_layout
        for toggle in range(1, 9):
            await pilot.press("space")
            policy, events = answer(policy, f"c{toggle}", toggle, trainable=toggle % 2 == 0)
            link.deliver(*events)
            await wait_for(pilot, lambda: not tree.changing, "the toggle answered")
            await pilot.pause(0.4)  # the frame that follows at the pace, and its list
            if toggle == 2:  # the rule's first line was mounted: from here on nothing moves
                app.screen._refresh_layout = lambda *a, **k: layouts.append(1) or lay_out(*a, **k)
        assert layouts == [], "a toggle rewrites a mark, a count and a rule's word: no whole-screen layout"
        rules = app.query_one(ControlsPanel).query_one("#rules").query(RemovableItem)
        assert [str(item.query_one(Static).render()) for item in rules] == ["0: train block1.b"]
        assert len(policy.freeze) == 1
