"""Automatic freezing (LISA, AutoFreeze): decisions at their steps, recorded as freeze entries that replay exactly,
optimizer state kept or dropped, resumed where it stopped, a user's rule winning over it, and validated like any section."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.methods.auto_freeze import method as auto_freeze_module

BLOCKS = ["block0", "block1", "block2", "block3"]


def lisa(**settings):
    return parse_policy({"auto_freeze": {"method": "lisa", **settings}})


def method_of(engine):
    return next(m for m in engine.methods if m.section == "auto_freeze")


def training_units(engine) -> set[str]:
    return {u.name for u in engine.units if any(engine.params[n].requires_grad for n in u.params)}


def watch(engine) -> list[tuple[int, set[str]]]:
    """The units that train for each optimizer step, read after the method's decision and before the forward."""
    method, seen = method_of(engine), []
    decide = method.before_step

    def spy(step: int) -> None:
        decide(step)
        seen.append((step, training_units(engine)))

    method.before_step = spy
    return seen


def run(engine) -> list[float]:
    losses: list[float] = []
    engine.sinks.append(lambda _line, ev: losses.append(ev["loss"]) if ev["type"] == "step" else None)
    assert engine.run() == "finished"
    return losses


def test_lisa_trains_n_layers_drawn_anew_every_interval_and_the_export_replays_it_exactly(make_engine):
    engine = make_engine("bert", lisa(interval=3, n_layers=2), steps=9, stats_every=100)
    seen = watch(engine)
    losses = run(engine)
    draws = []
    for start in (0, 3, 6):
        sets = [units for step, units in seen if start <= step < start + 3]
        assert len(sets) == 3 and sets[0] == sets[1] == sets[2]  # the draw holds for the whole interval
        blocks = sets[0] & set(BLOCKS)
        assert len(blocks) == 2 and {"embeddings", "head"} <= sets[0]
        draws.append(blocks)
    assert len({frozenset(d) for d in draws}) > 1  # resampled

    exported = engine.replayable_policy()
    changed = [0] + [
        3 * i for i in (1, 2) if draws[i] != draws[i - 1]
    ]  # a draw equal to the one in force changes nothing to record
    assert [e.step for e in exported.timeline] == changed
    assert all(rule.by == "auto_freeze" for e in exported.timeline for rule in e.freeze)
    assert exported.auto_freeze.decided_through == 6
    assert "decided_through: 6" in exported.to_yaml()

    replay = make_engine("bert", parse_policy(exported.model_dump(mode="json")), steps=9, stats_every=100)
    replay_seen = watch(replay)
    assert run(replay) == losses
    assert replay_seen == seen
    for name, p in replay.model.named_parameters():
        assert torch.equal(p, dict(engine.model.named_parameters())[name]), name
    assert replay.replayable_policy().timeline == exported.timeline  # the recorded freezes, not drawn again


@pytest.mark.parametrize("optimizer_state", ["keep", "drop"])
def test_the_adamw_state_of_a_refrozen_block_is_kept_or_dropped(make_engine, optimizer_state):
    engine = make_engine(
        "bert", lisa(interval=2, n_layers=1, optimizer_state=optimizer_state), steps=6, stats_every=100
    )
    seen = watch(engine)
    run(engine)
    trained = set().union(*(units for _, units in seen)) & set(BLOCKS)
    refrozen = trained - training_units(engine)
    assert refrozen  # a block trained, then LISA froze it again
    with_state = {
        b for b in refrozen if any(engine.optimizer.state.get(engine.params[n]) for n in engine.units[b].params)
    }
    assert with_state == (refrozen if optimizer_state == "keep" else set())


def test_a_resumed_run_continues_the_same_lisa_sequence(make_engine, tmp_path):
    whole = make_engine(
        "bert", lisa(interval=3, n_layers=1), run_dir=tmp_path / "a", steps=12, checkpoint_every=6, stats_every=100
    )
    losses = run(whole)
    resumed = make_engine("bert", lisa(interval=3, n_layers=1), run_dir=tmp_path / "b", steps=12, stats_every=100)
    resumed.resume_from(tmp_path / "a" / "checkpoints" / "step-0000006")
    assert run(resumed) == losses[6:]
    assert resumed.replayable_policy().timeline == whole.replayable_policy().timeline


def scripted_norms(monkeypatch, engine, norms):
    """The gradient norm AutoFreeze reads for each training block at each step: ``norms[block](step)``."""

    def fake(units, params):
        return {b: norms[b](engine.step) for b in BLOCKS if b in training_units(engine)}

    monkeypatch.setattr(auto_freeze_module, "grad_norms_by_unit", fake)


def test_autofreeze_freezes_front_blocks_once_their_gradient_norm_settled_front_to_back(make_engine, monkeypatch):
    policy = parse_policy({"auto_freeze": {"method": "autofreeze", "interval": 2, "threshold": 0.05}})
    engine = make_engine("bert", policy, steps=10, stats_every=1)
    scripted_norms(
        monkeypatch,
        engine,
        {
            "block0": lambda s: 1.0,  # settled from the start
            "block1": lambda s: 1.0 + min(s, 4),  # changes until step 4, flat from the interval after
            "block2": lambda s: 2.0,  # settled, but behind block1: waits for it
            "block3": lambda s: 1.0 + s * s,  # never settles
        },
    )
    seen = watch(engine)
    run(engine)
    frozen_at = {b: next((step for step, units in seen if b not in units), None) for b in [*BLOCKS, "embeddings"]}
    # intervals end at steps 2, 4, 6, 8; the first change is measured at 4 (interval 2 against interval 1)
    assert frozen_at == {"block0": 4, "embeddings": 4, "block1": 8, "block2": 8, "block3": None}
    exported = engine.replayable_policy()
    assert [e.step for e in exported.timeline] == [4, 8] and exported.auto_freeze.decided_through == 8

    # the export replays those freezes whatever its own gradients say (here: nothing ever settles)
    replay = make_engine("bert", parse_policy(exported.model_dump(mode="json")), steps=10, stats_every=1)
    scripted_norms(monkeypatch, replay, {b: (lambda s: 1.0 + s * s) for b in BLOCKS})
    replay_seen = watch(replay)
    run(replay)
    assert {b: next((step for step, units in replay_seen if b not in units), None) for b in frozen_at} == frozen_at
    assert replay.replayable_policy().timeline == exported.timeline


def test_autofreeze_with_gaps_freezes_a_settled_block_behind_a_training_one(make_engine, monkeypatch):
    policy = parse_policy(
        {"auto_freeze": {"method": "autofreeze", "interval": 2, "threshold": 0.05, "allow_gaps": True}}
    )
    engine = make_engine("bert", policy, steps=5, stats_every=1)
    scripted_norms(
        monkeypatch,
        engine,
        {
            "block0": lambda s: 1.0 + s,
            "block1": lambda s: 1.0 + s,
            "block2": lambda s: 2.0,
            "block3": lambda s: 1.0 + s,
        },
    )
    run(engine)
    assert training_units(engine) & set(BLOCKS) == {"block0", "block1", "block3"}
    assert "embeddings" in training_units(engine)  # block 0 trains: no frozen prefix to extend


def test_a_users_rule_after_a_decision_wins_and_lisa_leaves_that_block_alone(make_engine):
    policy = parse_policy(
        {
            "auto_freeze": {"method": "lisa", "interval": 3, "n_layers": 1},
            "timeline": [{"step": 4, "freeze": [{"layers": [1], "trainable": True}]}],
        }
    )
    engine = make_engine("bert", policy, steps=12, stats_every=100)
    logs: list[str] = []
    engine.sinks.append(lambda _line, ev: logs.append(ev["message"]) if ev["type"] == "log" else None)
    seen = watch(engine)
    run(engine)
    assert all("block1" in units for step, units in seen if step >= 4)
    assert all(
        len(units & set(BLOCKS) - {"block1"}) == 1 for step, units in seen if step >= 6
    )  # LISA draws among the others
    assert any(
        "auto_freeze: block1 follows your freeze rules from now on (lisa leaves it as you set it)" in line
        for line in logs
    )


def test_with_lora_a_frozen_block_freezes_its_lora_tensors(make_engine):
    policy = parse_policy(
        {
            "peft": {"method": "lora", "r": 2},
            "auto_freeze": {"method": "lisa", "interval": 2, "n_layers": 1, "head": False},
        }
    )
    engine = make_engine("bert", policy, steps=2, stats_every=100)
    run(engine)
    trains = [n for n, p in engine.params.items() if p.requires_grad]
    assert trains and all("lora_" in n for n in trains)
    assert len({engine.units.unit_for(n) for n in trains}) == 1  # the one drawn block's LoRA tensors, nothing else


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"method": "lisa", "n_layers": 0}, "auto_freeze.n_layers: Input should be greater than or equal to 1"),
        ({"method": "sometimes"}, "auto_freeze.method: Input should be 'none', 'lisa' or 'autofreeze'"),
        ({"method": "lisa", "every": 5}, "unknown key 'every' in auto_freeze"),
        ({"method": "autofreeze", "percentile": 0}, "auto_freeze.percentile: Input should be greater than 0"),
        (
            {"method": "lisa", "optimizer_state": "free"},
            "auto_freeze.optimizer_state: Input should be 'keep' or 'drop'",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_key(section, message):
    with pytest.raises(PolicyError) as err:
        parse_policy({"auto_freeze": section})
    assert message in str(err.value)


def test_more_layers_than_the_model_has_is_refused_naming_the_range(make_engine):
    with pytest.raises(
        PolicyError, match=r"auto_freeze.n_layers: 8 is more than the model's 4 blocks \(allowed: 1-4\)"
    ):
        make_engine("bert", lisa(n_layers=8))


def test_an_autofreeze_interval_shorter_than_the_statistics_is_refused(make_engine):
    with pytest.raises(
        PolicyError, match=r"auto_freeze.interval: 5 is shorter than stats_every \(10\).*allowed: 10 or more"
    ):
        make_engine("bert", parse_policy({"auto_freeze": {"method": "autofreeze", "interval": 5}}), stats_every=10)


def test_lisa_switched_on_live_decides_at_that_boundary_is_previewed_and_undone_whole(make_engine):
    from spu_engine.core.policy import Change

    engine = make_engine("bert", steps=6, stats_every=100)
    switch = Change(set={"auto_freeze": {"method": "lisa", "interval": 2, "n_layers": 1}})
    assert any(
        note.startswith("lisa: from the next step, every 2 steps 1 of the blocks train")
        for note in engine.preview(switch)["notes"]
    )
    engine.config.steps = 3
    run(engine)
    engine.apply_change(switch, source="client")
    engine.config.steps = 6
    seen = watch(engine)
    run(engine)
    assert [step for step, _ in seen] == [3, 4, 5] and all(len(units & set(BLOCKS)) == 1 for _, units in seen)
    assert [e.step for e in engine.replayable_policy().timeline] == [
        3,
        3,
        5,
    ]  # the switch, then LISA's draws at 3 and 5
    engine.undo()  # back to before the switch: LISA off and its freezes gone with it
    assert engine.current.auto_freeze.method == "none" and training_units(engine) >= set(BLOCKS)


def test_lisa_in_your_own_loop_draws_what_the_engine_draws(make_engine, tokenizer):
    from spu_engine.integrations import attach
    from support import build_tiny

    engine = make_engine("bert", lisa(interval=2, n_layers=1), steps=6, stats_every=100)
    in_engine = watch(engine)
    run(engine)
    model = build_tiny("bert", tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = attach(lisa(interval=2, n_layers=1), model, optimizer, seed=engine.config.seed)
    in_loop = []
    for step in range(6):
        ctl.step(step)
        in_loop.append((step, training_units(ctl)))
        model(input_ids=torch.randint(5, 900, (4, 12)), labels=torch.randint(0, 2, (4,))).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert in_loop == in_engine


def test_decisions_do_not_pile_up_in_the_freeze_list_and_what_trains_is_unchanged(make_engine):
    """Each decision overrides the last one's rules; the list keeps the first marked rule, the user's rules (the latest
    of each selector) and the latest decision."""
    import random

    from spu_engine.core.policy import Change, FreezeRule, Policy
    from spu_engine.runtime.selection import freeze_mask

    engine = make_engine("bert", None, steps=1)
    names, units = engine.param_names, engine.units
    rng = random.Random(0)
    policy, every_rule = Policy(), []
    for decision in range(60):
        if decision % 7 == 3:  # the user's own rule now and then: dropped only for a later one like it
            rules = [FreezeRule(layers=[rng.randrange(4)], trainable=bool(rng.getrandbits(1)))]
        else:
            chosen = sorted(rng.sample(range(4), 2))
            rules = [
                FreezeRule(layers=[0, 1, 2, 3], trainable=False, by="auto_freeze"),
                FreezeRule(layers=chosen, trainable=True, by="auto_freeze"),
                FreezeRule(units=["embeddings"], trainable=False, by="auto_freeze"),
                FreezeRule(units=["head"], trainable=True, by="auto_freeze"),
            ]
        policy = policy.apply(Change(freeze=rules))
        every_rule += rules
        assert freeze_mask(policy.freeze, names, units) == freeze_mask(every_rule, names, units)
    user_rules = [r for r in policy.freeze if r.by is None]
    made = [r for r in every_rule if r.by is None]
    latest = [r for i, r in enumerate(made) if all(later.layers != r.layers for later in made[i + 1 :])]
    assert len(made) == 9 and user_rules == latest, "a user's rule goes only when a later one repeats its selector"
    assert len(policy.freeze) <= 1 + len(user_rules) + 4
