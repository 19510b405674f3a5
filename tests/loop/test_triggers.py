"""Triggers in the timeline: at an epoch, or when an evaluation metric meets a condition; exported as step entries
that replay exactly, fired once across a resume, validated with messages that name the key."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from spu_engine.cli import app as spu
from spu_engine.core.policy import PolicyError, TimelineEntry
from spu_engine.core.policy_files import json_schema, parse_policy
from spu_engine.storage.checkpoint import latest_checkpoint

# "freeze all but the last layer once eval loss beats the best by a margin"
ALL_BUT_LAST = [{"units": ["embeddings"], "trainable": False}, {"layers": "0-2", "trainable": False}]
BEATS_BEST = {"when": {"metric": "eval_loss", "below_best_by": 0.03}, "freeze": ALL_BUT_LAST}
# eval after every step: 0.99 does not beat 1.0 by 0.03; 0.95 beats 0.99 by 0.04 -> fires at the evaluation of step 3;
# 0.90 (step 5) would beat 0.95 again, but a once-trigger has fired
LOSSES = [1.0, 0.99, 0.95, 0.96, 0.90, 0.85, 0.80, 0.70]


def scripted(engine, losses):
    """The evaluations of ``engine`` give ``losses`` in turn (the task's own metric stays fixed)."""
    script = iter(losses)
    engine.task.evaluate = lambda model, batches: {"eval_loss": next(script), "accuracy": 0.5, "eval_samples": 64}
    return engine


def run(engine) -> list[dict]:
    """Train to the end; the step events."""
    steps: list[dict] = []
    engine.sinks.append(lambda _line, ev: steps.append(ev) if ev["type"] == "step" else None)
    assert engine.run() == "finished"
    return steps


def frozen_units(engine) -> set[str]:
    return {u.name for u in engine.units if not any(engine.params[n].requires_grad for n in u.params)}


def test_a_when_trigger_fires_where_eval_loss_beats_the_best_by_the_margin_and_the_export_replays_it(make_engine):
    engine = scripted(
        make_engine("bert", parse_policy({"timeline": [BEATS_BEST]}), steps=8, eval_every=1, stats_every=100), LOSSES
    )
    steps = run(engine)
    assert frozen_units(engine) == {"embeddings", "block0", "block1", "block2"}
    total = sum(p.numel() for p in engine.model.parameters())
    assert [ev["trainable"] == total for ev in steps] == [True] * 3 + [
        False
    ] * 5  # optimizer steps 4.. train the last block and head
    exported = engine.replayable_policy()
    recorded, trigger = exported.timeline
    assert recorded.step == 3 and recorded.freeze == trigger.freeze and not recorded.is_trigger
    assert trigger.when is not None and trigger.fired == [3]

    # the export alone, with evaluations that never meet the condition: the recorded step entry does it all
    replay = scripted(
        make_engine("bert", parse_policy(exported.model_dump(mode="json")), steps=8, eval_every=1, stats_every=100),
        [1.0] * 8,
    )
    replay_steps = run(replay)
    assert [ev["loss"] for ev in replay_steps] == [ev["loss"] for ev in steps]
    for name, p in replay.model.named_parameters():
        assert torch.equal(p, dict(engine.model.named_parameters())[name]), name
    assert replay.replayable_policy().timeline == exported.timeline  # not fired twice, nothing new recorded


def test_a_repeating_trigger_fires_at_each_evaluation_where_it_holds_and_a_replay_decides_none_of_them_again(
    make_engine,
):
    every_time = {
        "when": {"metric": "eval_loss", "below": 0.92},
        "once": False,
        "freeze": [{"match": "*.bias", "trainable": False}],
    }
    engine = scripted(
        make_engine("bert", parse_policy({"timeline": [every_time]}), steps=8, eval_every=1, stats_every=100), LOSSES
    )
    run(engine)
    exported = engine.replayable_policy()
    assert exported.timeline[-1].fired == [5, 6, 7, 8]
    # recorded to replay: the first firing; at 6-8 the biases were frozen already, so those changed nothing
    assert [e.step for e in exported.timeline if not e.is_trigger] == [5]
    replay = scripted(
        make_engine("bert", parse_policy(exported.model_dump(mode="json")), steps=8, eval_every=1, stats_every=100),
        [0.5] * 8,
    )
    run(replay)
    assert replay.replayable_policy().timeline == exported.timeline


def test_at_epoch_2_fires_at_the_first_step_of_epoch_2_counted_from_0(make_engine):
    # 512 training samples, batch 64: 8 steps an epoch; epochs count from 0 as in the HF Trainer (state.epoch is 2.0
    # after 16 steps), so epoch 2 begins with optimizer step 17, after two full passes over the data
    policy = parse_policy(
        {"timeline": [{"at": {"epoch": 2}, "freeze": [{"units": ["embeddings"], "trainable": False}]}]}
    )
    engine = make_engine("bert", policy, steps=18, batch_size=64, stats_every=100)
    assert engine.steps_per_epoch == 8
    fired: list[dict] = []
    engine.sinks.append(lambda _line, ev: fired.append(ev) if ev["type"] == "policy" else None)
    steps = run(engine)
    assert [(ev["step"], ev["source"]) for ev in fired] == [(16, "trigger")]
    embeddings = sum(p.numel() for n, p in engine.params.items() if engine.units.unit_of[n] == "embeddings")
    assert steps[15]["trainable"] - steps[16]["trainable"] == embeddings  # step events 16 and 17
    assert engine.stream.epoch == 2  # the data stream agrees: step 17 drew from the third pass
    exported = engine.replayable_policy()
    assert [(e.step, e.at, e.fired) for e in exported.timeline] == [
        (16, None, []),
        (None, exported.timeline[1].at, [16]),
    ]
    assert "- at: {epoch: 2}\n" in exported.to_yaml() and "  fired: [16]\n" in exported.to_yaml()


def test_a_once_trigger_does_not_fire_again_after_a_resume(make_engine, tmp_path):
    policy = parse_policy({"timeline": [BEATS_BEST]})
    first = scripted(
        make_engine(
            "bert", policy, run_dir=tmp_path / "run", steps=4, eval_every=1, checkpoint_every=4, stats_every=100
        ),
        LOSSES,
    )
    run(first)
    assert first.triggers[0].fired == [3]
    resumed = make_engine("bert", policy, run_dir=tmp_path / "run", steps=8, eval_every=1, stats_every=100)
    resumed.resume_from(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert resumed.triggers[0].fired == [3] and resumed.metric_range["eval_loss"] == [0.95, 1.0]
    scripted(resumed, [0.5, 0.4, 0.3, 0.2])  # each would beat the best by far
    run(resumed)
    timeline = resumed.replayable_policy().timeline
    assert [e.step for e in timeline if not e.is_trigger] == [3] and timeline[-1].fired == [3]


def test_best_so_far_resumes_too_so_a_repeating_trigger_decides_as_without_the_stop(make_engine, tmp_path):
    repeat = {**BEATS_BEST, "once": False, "freeze": [{"match": "*.bias", "trainable": False}]}
    policy = parse_policy({"timeline": [repeat]})
    first = scripted(
        make_engine(
            "bert", policy, run_dir=tmp_path / "run", steps=4, eval_every=1, checkpoint_every=4, stats_every=100
        ),
        LOSSES,
    )
    run(first)
    resumed = make_engine("bert", policy, run_dir=tmp_path / "run", steps=8, eval_every=1, stats_every=100)
    resumed.resume_from(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    run(scripted(resumed, LOSSES[4:]))
    # the best before step 5 is 0.95, from before the stop (with it lost, 0.90 would be the first value and fire nothing)
    assert resumed.triggers[0].fired == [3, 5, 6, 7, 8]


def test_at_step_is_the_plain_step_entry():
    change = {"freeze": [{"units": ["head"], "trainable": False}]}
    assert TimelineEntry.model_validate({"at": {"step": 300}, **change}) == TimelineEntry.model_validate(
        {"step": 300, **change}
    )
    assert "step: 300" in parse_policy({"timeline": [{"at": {"step": 300}, **change}]}).to_yaml()


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"at": {"epoch": -1}}, "timeline[0].at.epoch: Input should be greater than or equal to 0 (got -1)"),
        ({"at": {"epoch": 1, "step": 2}}, "timeline[0].at: give exactly one of 'step' or 'epoch', e.g. {epoch: 2}"),
        ({"at": 3}, "timeline[0].at: a mapping such as {epoch: 2} or {step: 300} (got 3)"),
        (
            {"at": {"epoch": 2}, "step": 5},
            "timeline[0]: a timeline entry needs exactly one of 'step: N', 'at: {epoch: N}' or 'when: {metric: ..., below: ...}' (got step and at)",
        ),
        ({}, "timeline[0]: a timeline entry needs exactly one of"),
        (
            {"when": {"metric": "eval_loss"}},
            "timeline[0].when: give exactly one comparison of 'eval_loss': one of below, at_most, above, at_least, below_best_by, above_best_by",
        ),
        ({"when": {"metric": "eval_loss", "below": 1, "above": 0}}, "(got below, above)"),
        (
            {"when": {"metric": "eval_loss", "below": float("nan")}},
            "timeline[0].when.below: Input should be a finite number",
        ),
        (
            {"when": {"metric": "eval_loss", "below_best_by": -0.1}},
            "timeline[0].when.below_best_by: Input should be greater than or equal to 0 (got -0.1)",
        ),
        (
            {"when": {"metric": "$(reboot)", "below": 1}},
            "timeline[0].when.metric: a metric name is letters, digits, '_' and '.' (at most 64)",
        ),
        (
            {"when": {"metric": "eval_loss", "bellow": 1}},
            "unknown key 'bellow' in timeline[0].when; did you mean 'below'? Allowed: metric, below, at_most, above",
        ),
        (
            {"when": {"metric": "eval_loss", "below": 1}, "once": "sometimes"},
            "timeline[0].once: must be true or false",
        ),
        ({"step": 3, "once": False}, "timeline[0]: once: only for 'when' triggers (a step or epoch entry fires once)"),
        (
            {"step": 3, "fired": [3]},
            "timeline[0]: fired: only triggers (at: {epoch: N}, when) record the steps they fired at",
        ),
        (
            {"at": {"epoch": 1}, "fired": [-2]},
            "timeline[0].fired[0]: Input should be greater than or equal to 0 (got -2)",
        ),
    ],
)
def test_bad_triggers_are_refused_naming_the_key(entry, message):
    with pytest.raises(PolicyError) as err:
        parse_policy({"timeline": [{"freeze": ALL_BUT_LAST, **entry}]})
    assert message in str(err.value)


def test_a_trigger_that_changes_nothing_and_a_metric_the_task_lacks_are_refused(make_engine):
    with pytest.raises(
        PolicyError,
        match=r"timeline\[0\]: the trigger epoch 2 changes nothing: give 'freeze' rules and/or 'set' sections",
    ):
        parse_policy({"timeline": [{"at": {"epoch": 2}}]})
    with pytest.raises(PolicyError, match=r"timeline\[1\].set.pruning.method: Input should be"):
        parse_policy(
            {
                "timeline": [
                    {"step": 1, "freeze": ALL_BUT_LAST},
                    {"when": {"metric": "accuracy", "above": 0.8}, "set": {"pruning": {"method": "x"}}},
                ]
            }
        )
    f1 = parse_policy({"timeline": [{"when": {"metric": "f1", "at_least": 0.8}, "freeze": ALL_BUT_LAST}]})
    with pytest.raises(
        PolicyError,
        match=r"'f1' is not a field of the classification task's evaluation \(it gives eval_loss, accuracy, top_answer_share, eval_samples\)",
    ):
        make_engine("bert", f1)


def test_policy_validate_and_the_schema_show_the_trigger_forms(tmp_path):
    good = tmp_path / "triggers.yaml"
    good.write_text(
        "timeline:\n  - {at: {epoch: 2}, freeze: [{units: [embeddings], trainable: false}]}\n"
        "  - {when: {metric: eval_loss, below_best_by: 0.01}, once: true, freeze: [{layers: 0-2, trainable: false}]}\n"
    )
    result = CliRunner().invoke(spu, ["policy", "validate", str(good)])
    assert result.exit_code == 0 and "2 timeline entries" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "timeline:\n  - {when: {metric: eval_loss, under: 0.3}, freeze: [{units: [head], trainable: false}]}\n"
    )
    result = CliRunner().invoke(spu, ["policy", "validate", str(bad)])
    assert (
        result.exit_code == 2
        and "unknown key 'under' in timeline[0].when; Allowed: metric, below" in result.output
        and "Traceback" not in result.output
    )
    defs = json_schema()["$defs"]
    assert {"at", "when", "once", "after_step", "fired", "step"} <= set(defs["TimelineEntry"]["properties"])
    assert set(defs["At"]["properties"]) == {"step", "epoch"}
    assert {"metric", "below", "at_most", "above", "at_least", "below_best_by", "above_best_by"} == set(
        defs["MetricCondition"]["properties"]
    )


@pytest.mark.parametrize(
    "when, said",
    [
        ({"metric": "f1", "at_least": 50}, "f1 is on a 0-1 scale; 50 looks like a percent: use 0.5"),
        ({"metric": "eval_exact_match", "below": 80}, "eval_exact_match is on a 0-1 scale; 80 looks like a percent"),
        ({"metric": "accuracy", "above_best_by": 2}, "accuracy is on a 0-1 scale; 2 looks like a percent: use 0.02"),
        ({"metric": "mcc", "at_most": -40}, "mcc is on a -1 to 1 scale; -40 looks like a percent: use -0.4"),
    ],
)
def test_a_percent_threshold_on_a_fraction_is_refused_with_its_fraction(tmp_path, when, said):
    """Every score is 0-1 (SQuAD's F1 too): a bound above 1 would never hold (or always), whatever the task."""
    policy = tmp_path / "percent.yaml"
    policy.write_text(f"timeline:\n  - {{when: {when}, freeze: [{{units: [embeddings], trainable: false}}]}}\n")
    result = CliRunner().invoke(spu, ["policy", "validate", str(policy)])
    assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output
    assert parse_policy(
        {"timeline": [{"when": {**when, next(k for k in when if k != "metric"): 0.5}, "freeze": ALL_BUT_LAST}]}
    )
    assert parse_policy({"timeline": [{"when": {"metric": "eval_loss", "below": 50}, "freeze": ALL_BUT_LAST}]})


def parse_command(data: dict):
    import json

    from spu_engine.core.protocol import parse_command as parse

    return parse(json.dumps(data))


def test_a_console_adds_and_removes_triggers_live(make_engine):
    engine = scripted(make_engine("bert", steps=8, eval_every=1, stats_every=100), [0.5] * 8)
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    for _ in range(2):
        engine.train_step()
    when = {"when": {"metric": "accuracy", "at_least": 0.5}, "freeze": [{"units": ["embeddings"], "trainable": False}]}
    later = {"step": 6, "freeze": [{"units": ["head"], "trainable": False}]}
    for i, entry in enumerate([when, later, {"at": {"epoch": 0}, "freeze": ALL_BUT_LAST}]):
        engine.commands.handle(parse_command({"cmd": "schedule", "id": i, "entry": entry}))
    acks = [ev for ev in events if ev["type"] == "ack"]
    assert [a["ok"] for a in acks] == [True, True, False]
    assert "epoch 0 began at step 0 (the run is at step 2, 64 steps an epoch)" in acks[2]["message"]
    assert engine.triggers[0].after_step == 2  # checked from the next evaluation on, in this run and in a replay of it
    assert len([ev for ev in events if ev["type"] == "scheduled"][-1]["scheduled"]) == 2
    engine.commands.handle(parse_command({"cmd": "unschedule", "id": 9, "entry": later}))
    assert engine.pending == [] and events[-1]["message"] == "removed: step 6"
    engine.commands.handle(parse_command({"cmd": "unschedule", "id": 10, "entry": later}))
    assert events[-2]["ok"] is False and "no scheduled step 6" in events[-2]["message"]
    run(engine)
    assert engine.triggers[0].fired == [3]  # the first evaluation after it was added
    assert "- when: {metric: accuracy, at_least: 0.5}\n  after_step: 2\n" in engine.replayable_policy().to_yaml()


def test_an_own_loop_fires_epoch_and_when_triggers(tokenizer):
    from spu_engine.integrations import attach
    from support import build_tiny

    model = build_tiny("bert", tokenizer)
    policy = parse_policy(
        {
            "timeline": [
                {"at": {"epoch": 1}, "freeze": [{"units": ["embeddings"], "trainable": False}]},
                {"when": {"metric": "accuracy", "above": 0.7}, "freeze": [{"units": ["head"], "trainable": False}]},
            ]
        }
    )
    with pytest.raises(
        PolicyError, match=r"needs the epoch's length in steps: attach\(\.\.\., steps_per_epoch=len\(loader\)\)"
    ):
        attach(policy, model)
    ctl = attach(policy, model, steps_per_epoch=3)
    ctl.step(2)
    assert ctl.trainable_count() == sum(p.numel() for p in model.parameters())
    ctl.step(3)
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    ctl.on_eval({"eval_loss": 0.4, "eval_accuracy": 0.8})  # HF Trainer's names: eval_ + the metric
    assert not any(p.requires_grad for p in model.classifier.parameters())
    assert [t.fired for t in ctl.triggers] == [[3], [3]]
