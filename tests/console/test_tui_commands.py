"""The console's plain parts, without Textual: commands in flight, what events revise, the control fields."""

from __future__ import annotations

from spu_engine.core.policy import Policy, Pruning
from spu_tui.run_model import Aspect, RunModel
from spu_tui.session import CommandTracker
from spu_tui.widgets.control_fields import FIELD_BY_ID, FIELDS, section_problem, section_values


def test_a_command_goes_sent_then_received_then_answered():
    commands = CommandTracker()
    sent = commands.sent("c1", "change", rows=["block1"])
    assert not sent.received and commands.in_flight == {"c1": sent}
    assert commands.received("c1") is sent and sent.received
    assert commands.received("c1") is None, "a repeated received says nothing new"
    assert commands.in_flight == {"c1": sent}, "received is not applied: still in flight"
    assert commands.answered("c1") is sent and commands.in_flight == {}
    assert commands.answered("c1") is None and commands.received("c1") is None, "answered once, then forgotten"


def test_answers_to_commands_of_another_console_are_not_ours():
    commands = CommandTracker()
    commands.sent("c1", "preview", section="pruning")
    assert commands.received(7) is None and commands.answered("c2") is None
    preview = commands.answered("c1")  # a preview is answered by the preview itself, without an ack
    assert preview is not None and preview.section == "pruning" and commands.in_flight == {}


def test_events_revise_the_aspects_they_change_and_no_other():
    state = RunModel()
    state.apply({"type": "step", "t": 1.0, "step": 1, "loss": 0.7})
    assert state.revisions == {Aspect.PROGRESS: 1, Aspect.RUN: 1, Aspect.METRICS: 1}, (
        "the first step also ends the wait for it"
    )
    before = state.stamp((Aspect.UNITS, Aspect.POLICY, Aspect.LOG))
    state.apply({"type": "step", "t": 2.0, "step": 2, "loss": 0.6})
    assert state.revisions[Aspect.PROGRESS] == 2 and state.revisions[Aspect.RUN] == 1
    assert state.stamp((Aspect.UNITS, Aspect.POLICY, Aspect.LOG)) == before, (
        "views of units, policy and log stay as drawn"
    )
    state.apply({"type": "step", "t": 3.0, "step": 2, "loss": 0.6})
    assert state.revisions[Aspect.PROGRESS] == 2 and state.revisions[Aspect.METRICS] == 2, (
        "a step seen before changes nothing"
    )
    state.apply({"type": "eval", "t": 4.0, "step": 2, "eval_loss": 0.5, "accuracy": 0.8})
    assert state.revisions[Aspect.EVALS] == 1 and state.revisions[Aspect.LOG] == 1
    state.apply({"type": "brand_new_event", "t": 5.0})
    state.apply({"type": "step", "t": 5.0, "step": "not a number"})
    assert state.revisions[Aspect.LOG] == 2 and state.unreadable == 1, "an unreadable event is said in the log"


def test_control_fields_come_from_the_policy_models():
    assert FIELD_BY_ID["pr-method"].choices == ["none", "magnitude", "imp", "movement", "soft_movement"]
    assert FIELD_BY_ID["wus-enabled"].choices == ["off", "on"] and FIELD_BY_ID["wus-enabled"].parsed("on") is True
    assert FIELD_BY_ID["pr-target"].owner.__name__ == "PruningSchedule" and FIELD_BY_ID["pr-target"].choices is None
    assert FIELD_BY_ID["sb-keep"].problem("1.5") == "keep: 1.5 is out of range; allowed 0.0 < keep <= 1.0"
    assert FIELD_BY_ID["wus-patience"].problem("2") is None
    defaults = {f.id: f.value_in(Policy()) for f in FIELDS}
    assert defaults == {f.id: f.default for f in FIELDS}, "every field shows the policy's own default"
    texts = {
        "pr-method": "magnitude",
        "pr-scope": "global",
        "pr-structure": "weights",
        "pr-target": "0.5",
        "pr-start": "50",
        "pr-end": "5",
    }
    values = section_values("pruning", lambda f: texts[f.id])
    assert values == {
        "method": "magnitude",
        "scope": "global",
        "structure": "weights",
        "schedule": {"final_sparsity": 0.5, "start_step": 50, "end_step": 5},
    }
    assert section_problem("pruning", values) == "schedule: end_step (5) must be >= start_step (50)"
    values["schedule"]["end_step"] = 60
    assert section_problem("pruning", values) is None and Pruning.model_validate(values).schedule.end_step == 60


def test_a_peft_change_from_the_controls_carries_only_its_method_s_fields():
    shown = {f.id: f.value_in(Policy()) for f in FIELDS}
    lora = section_values("peft", lambda f: "lora" if f.id == "peft-method" else shown[f.id])
    assert lora["method"] == "lora" and "r" in lora and "alpha" in lora
    assert not {"init_r", "target_r", "size"} & set(lora), lora
    adapter = section_values("peft", lambda f: "adapter" if f.id == "peft-method" else shown[f.id])
    assert adapter == {"method": "adapter", "size": 64}


def test_every_control_label_fits_its_column_with_a_space():
    """The label column is 12 cells (app.tcss): a longer label runs into its value ("adapter size64")."""
    from spu_tui.widgets.control_fields import CONSOLE_SECTIONS

    long = [f.label for spec in CONSOLE_SECTIONS.values() for f in spec.fields if len(f.label) > 11]
    assert long == []
