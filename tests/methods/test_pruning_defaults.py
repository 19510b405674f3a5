"""Pruning's schedules default to the run's own length: the run ends at the final sparsity it was promised, a change
mid-run too, and the what-if says what the run's end will reach before the change is applied."""

from __future__ import annotations

import pytest

from spu_engine.core.policy import Change, Policy
from spu_engine.core.policy_files import parse_policy
from support import method_of, pruning_policy, run_steps


def default_schedule(method="magnitude", **section):
    return {"pruning": {"method": method, "schedule": {"final_sparsity": 0.5}, **section}}


@pytest.mark.slow
def test_a_600_step_run_with_the_default_schedule_ends_at_its_final_sparsity(make_engine):
    engine = make_engine(policy=parse_policy(default_schedule()), steps=600, batch_size=2, stats_every=100)
    pm = method_of(engine)
    assert pm.pruner.ramp.end == 599  # the run's last step, not a fixed 1000
    run_steps(engine, 600)
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-4)


def test_a_change_mid_run_ends_with_the_run(make_engine):
    engine = make_engine(steps=40, batch_size=2)
    run_steps(engine, 10)
    engine.apply_change(Change(set=default_schedule()), "test")
    pm = method_of(engine)
    assert (pm.pruner.ramp.start, pm.pruner.ramp.end) == (10, 39)
    run_steps(engine, 30)
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-4)


def test_the_what_if_says_what_the_run_reaches_by_its_end(make_engine):
    engine = make_engine(steps=600, batch_size=2)
    preview = engine.preview(Change(set=default_schedule()))
    assert "magnitude pruning: sparsity → 50% at step 599 (the run's last)" in preview["notes"]
    assert preview["sparsity"] == 0.5
    late = default_schedule(schedule={"final_sparsity": 0.5, "end_step": 1000})
    preview = engine.preview(Change(set=late))
    assert preview["sparsity"] == pytest.approx(0.4655, abs=1e-4)  # what the run's end reaches, not the target
    note = next(n for n in preview["notes"] if "pruning" in n)
    assert "reaches 46.6% by the run's end (step 599), not 50%: the schedule ends at step 1000" in note


def test_movement_holds_its_final_share_of_the_run(make_engine):
    engine = make_engine(policy=parse_policy(default_schedule("movement")), steps=100, batch_size=2)
    assert (method_of(engine).pruner.ramp.start, method_of(engine).pruner.ramp.end) == (10, 90)


def test_imp_rounds_share_the_run_by_default(make_engine):
    policy = pruning_policy("imp", imp={"rounds": 2, "round_steps": None, "fraction": 0.3, "reset": "pretrained"})
    engine = make_engine(policy=policy, steps=20, batch_size=2)
    pm = method_of(engine)
    assert pm.pruner.round_steps == 6  # 20 steps for the 3 masks IMP trains (the last one too)
    run_steps(engine, 20)
    assert pm.pruner.rounds_done == 2
    assert pm.sparsity() == pytest.approx(1 - 0.7**2, abs=1e-3)


def test_the_console_shows_an_unset_end_step_as_the_run_s_end():
    from spu_tui.widgets.control_fields import FIELD_BY_ID

    end = FIELD_BY_ID["pr-end"]
    assert end.value_in(Policy()) == "" and end.unset == "run's end"
    assert end.parsed("") is None and end.parsed("300") == 300
    assert end.problem("") is None and "not a whole number" in end.problem("soon")
