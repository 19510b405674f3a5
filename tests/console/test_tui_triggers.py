"""The console's timeline-and-triggers list: what is still to come and what fired, adding a typed trigger, removing one."""

from __future__ import annotations

import pytest

from spu_engine.core.policy_files import parse_policy
from spu_engine.core.runs import read_history
from spu_tui.app import SpuApp
from support import ScriptedLink, small_sst2

EPOCH_1 = {"at": {"epoch": 1}, "freeze": [{"units": ["embeddings"], "trainable": False}]}
NEVER = {"when": {"metric": "eval_loss", "below": 0}, "freeze": [{"units": ["head"], "trainable": False}]}


@pytest.fixture(scope="module")
def triggered_run(tmp_path_factory, tokenizer):
    """A finished 12-step tiny-BERT run of 8 steps an epoch whose epoch-1 trigger fired at step 8."""
    from spu_engine.loop.engine import Engine, EngineConfig
    from spu_engine.tasks import TaskOptions
    from spu_engine.tasks.classification import ClassificationTask
    from support import build_tiny

    run_dir = tmp_path_factory.mktemp("triggered")
    data = small_sst2(tmp_path_factory.mktemp("sst2"))
    task = ClassificationTask.build(
        str(data), tokenizer, TaskOptions(max_length=32, max_train_samples=64, max_eval_samples=16)
    )
    config = EngineConfig(
        model="tiny", data=str(data), steps=12, batch_size=8, lr=1e-3, warmup=0, eval_every=4, stats_every=4
    )
    engine = Engine(
        config,
        parse_policy({"timeline": [EPOCH_1, NEVER]}),
        run_dir,
        model=build_tiny("bert", tokenizer),
        tokenizer=tokenizer,
        task=task,
    )
    engine.run()
    engine.close()
    return run_dir, read_history(run_dir)


def listed(app) -> list[str]:
    return [str(item.query_one("Static").render()) for item in app.query_one("#scheduled").children]


async def test_triggers_are_listed_added_and_removed(triggered_run):
    run_dir, history = triggered_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        assert listed(app) == ["epoch 1: freeze embeddings  ✓ fired at step 8", "when eval_loss < 0: freeze head"]

        field = app.query_one("#trigger-new")
        field.focus()
        field.value = "when: {metric: eval_loss, below_best_by: -1}, freeze: [{layers: 0-2, trainable: false}]"
        await pilot.pause(0.1)
        status = app.query_one("#status-triggers")
        assert "when.below_best_by: Input should be greater than or equal to 0 (got -1)" in str(status.render())
        await pilot.press("enter")  # refused here: nothing is sent
        assert link.sent == []

        field.value = "when: {metric: eval_loss, below_best_by: 0.01}, freeze: [{layers: 0-2, trainable: false}]"
        await pilot.pause(0.1)
        await pilot.press("enter")
        added = {
            "when": {"metric": "eval_loss", "below_best_by": 0.01},
            "freeze": [{"layers": [0, 1, 2], "trainable": False}],
        }
        assert link.sent[-1] == ("schedule", {"entry": added})
        assert str(status.render()) == "sent: trigger change"

        t = max(e.get("t", 0) for e in history) + 1
        link.deliver({"type": "received", "t": t, "id": "c1", "cmd": "schedule"})
        await pilot.pause(0.1)
        assert str(status.render()) == "queued: trigger change applies at the next step boundary"
        scheduled = [{**EPOCH_1, "fired": [8]}, NEVER, {**added, "after_step": 12}]
        link.deliver(
            {"type": "scheduled", "t": t, "step": 12, "scheduled": scheduled},
            {
                "type": "ack",
                "t": t,
                "id": "c1",
                "cmd": "schedule",
                "step": 12,
                "ok": True,
                "message": "scheduled: when eval_loss < best - 0.01",
            },
        )
        await pilot.pause(0.2)
        assert listed(app)[2] == "when eval_loss < best - 0.01 after step 12: freeze layers [0, 1, 2]"
        assert str(status.render()) == "scheduled: when eval_loss < best - 0.01" and field.value == ""

        view = app.query_one("#scheduled")
        view.focus()
        view.index = 1
        await pilot.press("x")
        assert link.sent[-1] == ("unschedule", {"entry": NEVER})
        link.deliver(
            {
                "type": "ack",
                "t": t,
                "id": "c2",
                "cmd": "unschedule",
                "step": 12,
                "ok": False,
                "message": "remove: no scheduled when eval_loss < 0",
            }
        )
        await pilot.pause(0.2)
        assert str(status.render()) == "refused: remove: no scheduled when eval_loss < 0" and status.has_class("-error")
