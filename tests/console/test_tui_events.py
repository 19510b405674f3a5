"""Typed events: the console redraws any run's history, whatever the engine's state or version wrote.

A run that switches LoRA on mid-way changes the model's tensors: its policy event
carries the new units, and the reattached tree shows the LoRA tensors under
their blocks (stable names, no ``base_layer``).  Events of shapes the console
cannot read are skipped with a log line, never a crash.
"""

from __future__ import annotations

import json

import pytest

from spu_engine.core.policy import Change, FreezeRule
from spu_engine.core.protocol import PolicyEvent, read_event
from spu_tui.app import SpuApp
from spu_tui.widgets.unit_tree import Row, UnitTree
from support import ScriptedLink, record_run, screen_lines


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    """Freeze one query weight at step 2, switch LoRA on at step 4: the sequence that crashed attach before."""
    query = "bert.encoder.layer.1.attention.self.query.weight"
    timeline = [
        (2, Change(freeze=[FreezeRule(match=query, trainable=False)])),
        (4, Change(set={"peft": {"method": "lora", "r": 2}})),
    ]
    return record_run(tmp_path_factory, tokenizer, "lora-run", timeline, steps=8, eval_every=0, stats_every=2)


def test_the_policy_event_of_a_peft_switch_carries_the_new_tensors(lora_run):
    _, history = lora_run
    policy_events = [read_event(ev) for ev in history if ev["type"] == "policy"]
    assert all(isinstance(ev, PolicyEvent) for ev in policy_events)
    freeze, lora = policy_events
    assert freeze.units is None  # the same tensors: nothing to redraw
    names = {p.name for u in lora.units for p in u.params}
    assert "bert.encoder.layer.1.attention.self.query.lora_A.weight" in names
    assert "bert.encoder.layer.1.attention.self.query.weight" in names and not any(
        "base_layer" in n or ".default" in n for n in names
    )
    assert (
        "bert.encoder.layer.1.attention.self.query.weight" in lora.frozen_tensors
    )  # the rule written before LoRA still holds


async def test_reattach_shows_the_lora_rows_and_toggles_one(lora_run):
    run_dir, history = lora_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        tree = app.query_one(UnitTree)
        lora_a = Row("tensor", "bert.encoder.layer.1.attention.self.query.lora_A.weight")
        assert lora_a in tree.rows and tree.rows[lora_a] == Row("unit", "block1")
        tree.move_to(lora_a)
        await pilot.pause(0.2)
        assert tree.cursor_node.data == lora_a
        await pilot.press("space")
        await pilot.pause(0.1)
        assert [change["freeze"] for change in link.changes()] == [[{"match": lora_a.name, "trainable": False}]]
        tree.root.expand_all()
        await pilot.pause(0.2)
        assert any("lora_A.weight" in line for line in screen_lines(app))


async def test_history_of_unknown_and_malformed_events_draws_without_error(lora_run, tmp_path):
    run_dir, history = lora_run
    odd = [
        {"type": "step", "t": 1.0, "step": "not a number", "loss": 0.5},
        {"type": "units", "t": 1.0, "step": 3, "units": {"block0": {"trainable": "yes"}}},
        {"type": "policy", "t": 1.0, "step": 3, "units": [{"params": "none"}]},
        {"type": "brand_new_event", "t": 1.0, "anything": [1, 2]},
        {
            "type": "hello",
            "t": 1.0,
            "units": [{"name": "block9", "numel": 5, "params": [{"name": "block9.x", "numel": 5, "extra": 1}]}],
        },
        "not even a mapping",
        {"no": "type"},
    ]
    app = SpuApp(run_dir, history=[*history, *odd], connect=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        assert app.state.unreadable == 3  # the three known types with a wrong shape; the rest are not events at all
        assert any("cannot read" in line.text for line in app.state.log)
        assert Row("unit", "block9") in app.query_one(UnitTree).rows  # a unit never seen before is added
        json.dumps([ev for ev in odd if isinstance(ev, dict)])  # the history itself stays as it was


def test_sparsity_bars_move_at_the_step_the_masks_change(make_engine):
    """The step event of a mask change carries per-unit sparsity, between the periodic unit statistics."""
    from spu_engine.core.policy_files import parse_policy
    from spu_tui.run_model import RunModel

    policy = parse_policy(
        {
            "pruning": {
                "method": "magnitude",
                "schedule": {"start_step": 3, "end_step": 3, "every": 1, "final_sparsity": 0.5},
            }
        }
    )
    engine = make_engine("bert", policy, stats_every=100)
    events = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    for _ in range(5):
        engine.train_step()
    steps = [ev for ev in events if ev["type"] == "step"]
    with_units = [ev["step"] for ev in steps if "units" in ev.get("pruning", {})]
    assert with_units == [4]  # the step at which the masks went to 50 %, not every step
    state = RunModel()
    for ev in events:
        state.apply(ev)
    assert 0.3 < state.unit_stats["block0"].sparsity < 0.6 and state.unit_stats["embeddings"].sparsity == 0.0


def test_the_header_says_what_the_engine_waits_for_until_the_first_step():
    from spu_tui.run_model import RunModel

    state = RunModel()
    state.apply({"type": "state", "t": 1.0, "state": "loading", "message": "reading and tokenizing data/sst2"})
    assert state.waiting == "reading and tokenizing data/sst2"
    state.apply({"type": "state", "t": 2.0, "state": "training", "message": "trainable 10 of 10"})
    assert state.waiting.startswith("the first step")
    state.apply({"type": "step", "t": 3.0, "step": 1, "loss": 0.7})
    assert state.waiting == ""


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory, tokenizer):
    """IMP switched on at step 0: two rounds of 2 steps, so rounds 0, 1 and 2 end at steps 2, 4 and 6."""
    imp = Change(set={"pruning": {"method": "imp", "imp": {"rounds": 2, "round_steps": 2, "fraction": 0.5}}})
    return record_run(tmp_path_factory, tokenizer, "imp-run", [(0, imp)], steps=6, eval_every=0, stats_every=2)


async def test_the_sparsity_panel_steps_through_the_imp_rounds(imp_run):
    run_dir, history = imp_run
    rounds = [ev for ev in history if ev["type"] == "imp_round"]
    app = SpuApp(run_dir, history=history, connect=False)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.pause(0.3)
        chart = app.screen.panels["sparsity"]
        units = [u.name for u in app.state.units]
        assert [r.round for r in app.state.imp_rounds] == [0, 1, 2] and chart.round is None
        assert any("IMP round 2/2 ended: sparsity 75.0%" in line.text for line in app.state.log)
        live = list(chart._shown.values)
        await pilot.press("left_square_bracket")  # the last round
        assert chart.round == 2
        assert chart._shown.values == pytest.approx([1 - rounds[2]["kept_by_unit"].get(n, 1.0) for n in units])
        assert any("IMP round 2/2 · 75.0% [ ]" in line for line in screen_lines(app))
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert chart.round == 0 and chart._shown.values == [0.0] * len(
            units
        )  # round 0 trains the mask before any pruning
        await pilot.press("right_square_bracket", "right_square_bracket", "right_square_bracket")
        assert chart.round is None and chart._shown.values == live
        assert any("now · [ ] IMP rounds" in line for line in screen_lines(app))
