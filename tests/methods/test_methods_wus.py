"""Weight-update skipping: bias-only phases, switches on eval loss, switches in the timeline, replay without double switches."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.methods.targets import is_bias
from spu_engine.methods.weight_update_skipping.method import WeightUpdateSkipping

# eval after every step; these runs start bias_only (the default first phase is full), patience 2:
# evals 1,2 improve; 3,4 do not -> full from step 4; 5 improves, 6,7 do not -> bias_only from step 7
LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.9, 0.7]
SWITCHES = [(4, "full"), (7, "bias_only")]
PHASES = ["bias_only"] * 4 + ["full"] * 3 + ["bias_only"]  # of optimizer steps 1..8


def wus_policy(**settings):
    return parse_policy(
        {"weight_update_skipping": {"enabled": True, "patience": 2, "start_phase": "bias_only", **settings}}
    )


def scripted_run(make_engine, policy, losses):
    """Run 8 steps with an evaluation after each whose eval_loss comes from ``losses``; return the engine and its step events."""
    engine = make_engine("bert", policy, steps=8, eval_every=1, stats_every=100)
    script = iter(losses)
    engine.task.evaluate = lambda model, batches: {"eval_loss": next(script), "accuracy": 0.5}
    steps = []
    engine.sinks.append(lambda _line, ev: steps.append(ev) if ev["type"] == "step" else None)
    assert engine.run() == "finished"
    return engine, steps


def switches(policy) -> list[tuple[int, str]]:
    return [
        (e.step, e.set["weight_update_skipping"]["phase"]) for e in policy.timeline if "weight_update_skipping" in e.set
    ]


def test_bias_only_phase_updates_biases_only(make_engine):
    engine = make_engine("bert", wus_policy())
    expected = {n for n in engine.param_names if is_bias(n)}
    assert {n for n, p in engine.model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    engine.train_step()
    engine.train_step()
    changed = {n for n, p in engine.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected
    assert engine.train_step()["wus_phase"] == "bias_only"


def test_last_k_blocks_limits_the_bias_phase(make_engine):
    engine = make_engine("bert", wus_policy(last_k_blocks=2))
    trainable = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n in engine.param_names if is_bias(n) and engine.units.unit_of[n] in ("block2", "block3")
    }
    with pytest.raises(PolicyError, match=r"weight_update_skipping.last_k_blocks: 5 is more than the model's 4 blocks"):
        engine.apply_change(Change(set={"weight_update_skipping": {"last_k_blocks": 5}}), source="client")


def test_phases_switch_on_eval_loss_and_every_switch_is_in_the_timeline(make_engine):
    engine, steps = scripted_run(make_engine, wus_policy(), LOSSES)
    assert switches(engine.replayable_policy()) == SWITCHES
    assert [ev["wus_phase"] for ev in steps] == PHASES  # step event n reports the phase of optimizer step n
    trainable = [ev["trainable"] for ev in steps]
    assert trainable[4] == sum(p.numel() for p in engine.model.parameters()) > trainable[0]
    assert engine.current.weight_update_skipping.phase == "bias_only"


@pytest.mark.parametrize("replay_losses", [LOSSES, [1.0] * 8], ids=["same-evals", "evals-that-would-switch-elsewhere"])
def test_replay_takes_the_recorded_phases_once(make_engine, replay_losses):
    original, _ = scripted_run(make_engine, wus_policy(), LOSSES)
    exported = parse_policy(original.replayable_policy().model_dump(mode="json"))
    replay, steps = scripted_run(make_engine, exported, replay_losses)
    assert switches(replay.replayable_policy()) == SWITCHES  # no switch twice, none invented, none lost
    assert [ev["wus_phase"] for ev in steps] == PHASES


def test_full_start_phase_and_disable(make_engine):
    engine = make_engine("bert", wus_policy(start_phase="full"))
    wus = next(m for m in engine.methods if isinstance(m, WeightUpdateSkipping))
    assert wus.phase == "full" and engine.trainable_count() == sum(p.numel() for p in engine.model.parameters())
    for loss in (1.0, 1.1, 1.2):
        wus.on_eval(engine.step, {"eval_loss": loss})
    assert wus.phase == "bias_only" and switches(engine.replayable_policy()) == [(0, "bias_only")]
    engine.apply_change(Change(set={"weight_update_skipping": {"enabled": False}}), source="client")
    assert wus.phase is None and "wus_phase" not in engine.train_step()
    assert engine.trainable_count() == sum(p.numel() for p in engine.model.parameters())
