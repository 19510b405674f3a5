"""Per-unit learning rates: multipliers and layer-wise decay in the optimizer's groups, warm-in after a live unfreeze,
live changes that keep AdamW's state, and resume and replay that keep both."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, FreezeRule, Policy, PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.integrations import attach
from spu_engine.loop.trainer import group_lr_scale
from spu_engine.storage.checkpoint import latest_checkpoint

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"
QUERY3 = "bert.encoder.layer.3.attention.self.query.weight"


def lr_of(engine, name: str) -> float:
    """The lr the optimizer used for tensor ``name`` at its last step."""
    p = engine.params[name]
    return next(g["lr"] for g in engine.optimizer.param_groups if any(q is p for q in g["params"]))


def scale_of(engine, name: str) -> float:
    p = engine.params[name]
    return next(g["lr_scale"] for g in engine.optimizer.param_groups if any(q is p for q in g["params"]))


def test_a_units_multiplier_is_in_its_group_and_multiplies_the_schedule(make_engine):
    policy = parse_policy({"lr": {"scale": [{"layers": [0], "scale": 0.25}, {"units": ["head"], "scale": 4}]}})
    engine = make_engine(policy=policy, steps=10, warmup=4)
    for _ in range(6):
        engine.train_step()
    step = engine.step - 1  # the step just taken
    schedule = engine.config.lr * engine._lr_factor(step)
    assert lr_of(engine, QUERY0) == pytest.approx(0.25 * schedule)
    assert lr_of(engine, "classifier.weight") == pytest.approx(4 * schedule)
    assert lr_of(engine, QUERY3) == pytest.approx(schedule)
    assert scale_of(engine, QUERY0) == 0.25 and scale_of(engine, "bert.encoder.layer.0.output.LayerNorm.weight") == 0.25
    assert {g["name"] for g in engine.optimizer.param_groups} == {"decay", "no_decay"}  # weight decay stays per group


def test_layerwise_decay_gives_the_top_block_one_and_the_embeddings_the_lowest(make_engine):
    engine = make_engine(policy=parse_policy({"lr": {"decay": 0.8}}))  # 4 blocks
    assert scale_of(engine, "classifier.weight") == 1.0
    assert scale_of(engine, QUERY3) == 1.0
    assert scale_of(engine, "bert.encoder.layer.2.attention.self.query.weight") == pytest.approx(0.8)
    assert scale_of(engine, QUERY0) == pytest.approx(0.8**3)
    assert scale_of(engine, "bert.embeddings.word_embeddings.weight") == pytest.approx(0.8**4)
    both = make_engine(policy=parse_policy({"lr": {"decay": 0.8, "scale": [{"units": ["embeddings"], "scale": 0.5}]}}))
    assert scale_of(both, "bert.embeddings.word_embeddings.weight") == pytest.approx(
        0.5 * 0.8**4
    )  # a rule times the decay


def test_a_block_unfrozen_live_ramps_its_lr_in_over_warm_in_steps(make_engine):
    policy = Policy(freeze=[FreezeRule(layers=[0], trainable=False)]).apply(Change(set={"lr": {"warm_in": 4}}))
    engine = make_engine(policy=policy, steps=12)
    for _ in range(3):
        engine.train_step()
    engine.apply_change(Change(freeze=[FreezeRule(layers=[0], trainable=True)]), source="client")  # before step 3
    ramp, plain = [], []
    for _ in range(6):
        engine.train_step()
        ramp.append(lr_of(engine, QUERY0))
        plain.append(lr_of(engine, QUERY3))
    assert [r / p for r, p in zip(ramp, plain)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert engine.warm_from == {}  # the ramp is over: block 0 is back in its plain group
    assert sum(1 for g in engine.optimizer.param_groups if g["name"] == "decay") == 1


def test_group_lr_scale_ramps_from_its_start():
    group = {"lr_scale": 2.0, "warm_from": 10}
    assert [group_lr_scale(group, s, 4) for s in range(10, 15)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert group_lr_scale({"lr_scale": 2.0, "warm_from": None}, 10, 4) == 2.0


def test_changing_a_multiplier_live_keeps_adamw_state(make_engine):
    engine = make_engine()
    for _ in range(2):
        engine.train_step()
    p = engine.params[QUERY0]
    moments = {k: v.clone() for k, v in engine.optimizer.state[p].items()}
    engine.apply_change(Change(set={"lr": {"scale": [{"layers": [0], "scale": 0.1}]}}), source="client")
    assert scale_of(engine, QUERY0) == 0.1
    assert all(torch.equal(engine.optimizer.state[p][k], v) for k, v in moments.items())
    engine.train_step()
    assert engine.optimizer.state[p]["step"] == moments["step"] + 1


def run_with_live_changes(make_engine, run_dir, steps_before_checkpoint: int | None = None):
    """6 steps: decay from the start, block 0 frozen then unfrozen live at step 2 with a 4-step warm-in."""
    engine = make_engine(
        run_dir=run_dir,
        steps=6,
        policy=parse_policy({"lr": {"decay": 0.7, "warm_in": 4}, "freeze": [{"layers": [0], "trainable": False}]}),
    )
    losses = []
    for step in range(6):
        if step == 2:
            engine.apply_change(
                Change(
                    freeze=[FreezeRule(layers=[0], trainable=True)],
                    set={"lr": {"scale": [{"units": ["head"], "scale": 3}]}},
                ),
                source="client",
            )
        losses.append(engine.train_step()["loss"])
        if steps_before_checkpoint is not None and engine.step == steps_before_checkpoint:
            engine.save_checkpoint()
    return engine, losses


def test_multipliers_and_warm_in_survive_a_resume(make_engine, tmp_path):
    engine, losses = run_with_live_changes(make_engine, tmp_path / "run", steps_before_checkpoint=4)
    resumed = make_engine(run_dir=tmp_path / "resumed", steps=6)
    resumed.resume_from(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert resumed.step == 4 and resumed.warm_from == dict.fromkeys(resumed.warm_from, 2) and resumed.warm_from
    assert scale_of(resumed, "classifier.weight") == 3.0 and scale_of(resumed, QUERY3) == 1.0
    again = [resumed.train_step()["loss"] for _ in range(2)]
    assert again == pytest.approx(losses[4:], abs=1e-6)
    assert lr_of(resumed, QUERY0) == pytest.approx(lr_of(engine, QUERY0))


def test_an_exported_run_replays_its_multipliers_exactly(make_engine, tmp_path):
    engine, losses = run_with_live_changes(make_engine, tmp_path / "run")
    exported = parse_policy(engine.replayable_policy().model_dump(mode="json"))
    replay = make_engine(run_dir=tmp_path / "replay", steps=6, policy=exported)
    replayed = []
    for _ in range(6):
        replay.apply_due(replay.step)  # the engine's boundary: the recorded change applies at its step
        replayed.append(replay.train_step()["loss"])
    assert replayed == losses
    assert replay.warm_from == engine.warm_from and scale_of(replay, "classifier.weight") == 3.0


@pytest.mark.parametrize(
    "section, message",
    [
        ({"decay": 1.5}, "lr.decay: Input should be less than or equal to 1"),
        ({"decay": 0}, "lr.decay: Input should be greater than 0"),
        ({"warm_in": -1}, "lr.warm_in: Input should be greater than or equal to 0"),
        ({"scale": [{"layers": [0], "scale": 0}]}, "lr.scale[0].scale: Input should be greater than 0"),
        ({"scale": [{"scale": 2}]}, "a scale rule needs at least one of 'match', 'layers', 'units'"),
        ({"rate": 2}, "unknown key 'rate' in lr; Allowed: decay, scale, warm_in"),
    ],
)
def test_bad_lr_settings_are_refused_naming_the_key(section, message):
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_policy({"lr": section})


def test_a_scale_rule_that_selects_nothing_is_refused_against_the_model(make_engine):
    with pytest.raises(PolicyError, match=r"lr.scale\[0\].units\[0\]: unknown unit 'heads'"):
        make_engine(policy=parse_policy({"lr": {"scale": [{"units": ["heads"], "scale": 2}]}}))
    engine = make_engine()
    with pytest.raises(PolicyError, match=r"lr.scale\[0\].layers\[0\]: block index 9 is out of range"):
        engine.add_scheduled(
            parse_policy({"timeline": [{"step": 5, "set": {"lr": {"scale": [{"layers": [9], "scale": 2}]}}}]}).timeline[
                0
            ]
        )


def test_own_loop_refuses_per_unit_rates(tokenizer):
    from support import build_tiny

    model = build_tiny("bert", tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(PolicyError, match="lr: per-unit learning rates need the engine's optimizer groups"):
        attach(parse_policy({"lr": {"decay": 0.9}}), model, optimizer)


def test_the_preview_says_each_units_multiplier_before_the_change(make_engine):
    engine = make_engine()
    notes = engine.preview(
        Change(set={"lr": {"decay": 0.5, "warm_in": 3, "scale": [{"match": "*.bias", "scale": 2}]}})
    )["notes"]
    assert (
        "lr multipliers: embeddings x0.0625-0.125, block0 x0.125-0.25, block1 x0.25-0.5, block2 x0.5-1, block3 x1-2, head x1-2"
        in notes
    )
    assert "warm-in: a tensor that starts training from now on ramps its lr in over 3 steps" in notes
    assert scale_of(engine, QUERY0) == 1.0  # a preview changes nothing
