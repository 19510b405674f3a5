"""The step loop: real freezing, optimizer state only where gradients flowed, changes at boundaries."""

from __future__ import annotations

import torch

from spu_engine.core.policy import Change, FreezeRule, Policy, TimelineEntry
from support import collapse_to_class_0


def _snapshot(engine):
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def _changed_units(engine, before):
    changed = set()
    for n, p in engine.model.named_parameters():
        if not torch.equal(p, before[n]):
            changed.add(engine.units.unit_of[n])
    return changed


def test_frozen_tensors_get_no_grad_and_no_adam_state(make_engine):
    policy = Policy(
        freeze=[FreezeRule(units=["embeddings"], trainable=False), FreezeRule(layers=[0, 1], trainable=False)]
    )
    engine = make_engine(policy=policy)
    before = _snapshot(engine)
    for _ in range(3):
        engine.train_step()
    frozen_units = {"embeddings", "block0", "block1"}
    assert _changed_units(engine, before) == {"block2", "block3", "head"}
    for n, p in engine.model.named_parameters():
        frozen = engine.units.unit_of[n] in frozen_units
        assert p.requires_grad is not frozen
        assert p.grad is None
        # Adam state exists exactly for the tensors that received gradients
        assert (p in engine.optimizer.state) is not frozen, n
    expected = sum(p.numel() for n, p in engine.model.named_parameters() if engine.units.unit_of[n] not in frozen_units)
    assert engine.trainable_count() == expected


def test_unfreezing_keeps_existing_adam_state(make_engine):
    engine = make_engine()
    engine.train_step()
    block0 = [p for n, p in engine.model.named_parameters() if engine.units.unit_of[n] == "block0"]
    saved = {id(p): engine.optimizer.state[p]["exp_avg"].clone() for p in block0}
    engine.apply_change(Change(freeze=[FreezeRule(layers=[0], trainable=False)]), source="test")
    engine.train_step()
    for p in block0:  # frozen: state untouched
        assert torch.equal(engine.optimizer.state[p]["exp_avg"], saved[id(p)])
    engine.apply_change(Change(freeze=[FreezeRule(layers=[0], trainable=True)]), source="test")
    engine.train_step()
    for p in block0:  # trains again from the state it had, not a fresh one
        assert int(engine.optimizer.state[p]["step"]) == 2


def test_commands_apply_at_the_boundary_and_are_recorded(make_engine, tmp_path):
    from spu_engine.core.protocol import parse_command

    engine = make_engine(run_dir=tmp_path / "run", steps=6)
    engine.submit(
        parse_command('{"cmd": "change", "id": 1, "change": {"freeze": [{"layers": [0], "trainable": false}]}}')
    )
    engine.boundary()
    assert not any(p.requires_grad for n, p in engine.model.named_parameters() if engine.units.unit_of[n] == "block0")
    assert engine.recorded == [TimelineEntry(step=0, freeze=[FreezeRule(layers=[0], trainable=False)])]
    engine.submit(
        parse_command('{"cmd": "change", "id": 2, "change": {"freeze": [{"match": "nothing.*", "trainable": false}]}}')
    )
    engine.boundary()  # a bad change is refused and changes nothing
    assert len(engine.recorded) == 1
    lines = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    assert any('"type":"ack"' in line and '"ok":false' in line and "matches no parameter" in line for line in lines)


def test_timeline_is_replayed_at_its_steps(make_engine, tmp_path):
    policy = Policy(
        freeze=[FreezeRule(units=["embeddings"], trainable=False)],
        timeline=[
            TimelineEntry(step=2, freeze=[FreezeRule(layers=[0], trainable=False)]),
            TimelineEntry(step=4, freeze=[FreezeRule(layers=[0], trainable=True)]),
        ],
    )
    engine = make_engine(policy=policy, run_dir=tmp_path / "run", steps=6)
    changed_per_step = []
    for _ in range(6):
        engine.boundary()
        before = _snapshot(engine)
        engine.train_step()
        changed_per_step.append("block0" in _changed_units(engine, before))
    assert changed_per_step == [True, True, False, False, True, True]
    assert [e.step for e in engine.recorded] == [2, 4]
    assert engine.replayable_policy().timeline == policy.timeline


def test_checkpoint_round_trip(make_engine, tmp_path):
    from spu_engine.storage.checkpoint import latest_checkpoint, restore_rng, rng_state

    engine = make_engine(run_dir=tmp_path / "run", policy=Policy(freeze=[FreezeRule(layers=[1], trainable=False)]))
    for _ in range(3):
        engine.train_step()
    path = engine.save_checkpoint()
    weights = _snapshot(engine)
    other = make_engine(run_dir=tmp_path / "run2")
    other.resume_from(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert other.step == 3 and other.current.freeze == engine.current.freeze
    for n, p in other.model.named_parameters():
        assert torch.equal(p, weights[n])
    assert path.name == "step-0000003"
    # the same next batch, dropout stream and optimizer state give the same next step
    rng = rng_state()  # resume_from restored the checkpoint's RNG (CPU and CUDA); both engines share this process
    engine.train_step()
    restore_rng(rng)
    other.train_step()
    for (n, p), (_, q) in zip(engine.model.named_parameters(), other.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), (n, (p - q).abs().max().item())


def test_a_change_that_changes_nothing_is_not_recorded(make_engine):
    from spu_engine.core.policy import Change

    engine = make_engine()
    engine.train_step()
    engine.apply_change(Change(set={"selective_backprop": {"keep": 0.4}}), "test")
    engine.apply_change(Change(set={"selective_backprop": {"keep": 0.4}}), "test")  # the value already in force
    assert [e.set for e in engine.replayable_policy().timeline] == [{"selective_backprop": {"keep": 0.4}}]


def test_a_hello_command_writes_nothing_to_the_events_log(make_engine, tmp_path):
    from spu_engine.core.protocol import HelloCmd

    engine = make_engine(run_dir=tmp_path / "run")
    before = (tmp_path / "run" / "events.jsonl").read_bytes()
    for i in range(50):
        engine.submit(HelloCmd(cmd="hello", id=i))
    engine.boundary()
    assert (tmp_path / "run" / "events.jsonl").read_bytes() == before
    engine.close()


def test_export_writes_only_a_new_file_unless_confirmed_and_keeps_the_mode(make_engine, tmp_path):
    import os

    from spu_engine.core.policy_files import load_policy
    from spu_engine.core.protocol import ExportCmd

    engine = make_engine(run_dir=tmp_path / "run")
    acks: list[dict] = []
    engine.sinks.append(lambda _line, ev: acks.append(ev) if ev["type"] == "ack" else None)
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    mine.chmod(0o644)
    engine.submit(ExportCmd(cmd="export", path=str(mine)))
    engine.boundary()
    assert (
        not acks[-1]["ok"] and "exists; it is replaced only when you confirm (overwrite: true)" in acks[-1]["message"]
    )
    assert mine.read_text() == "my notes\n" and os.stat(mine).st_mode & 0o777 == 0o644
    engine.submit(ExportCmd(cmd="export", path=str(mine), overwrite=True))  # what the console sends after asking
    engine.boundary()
    assert acks[-1]["ok"] and load_policy(mine) == engine.replayable_policy() and os.stat(mine).st_mode & 0o777 == 0o644
    new = tmp_path / "new.yaml"
    engine.submit(ExportCmd(cmd="export", path=str(new)))
    engine.boundary()
    assert acks[-1]["ok"] and load_policy(new) == engine.replayable_policy()
    engine.close()


def test_an_evaluation_giving_every_example_one_answer_is_called_a_collapse_once_and_its_end_is_said(make_engine):
    engine = make_engine()
    logs = collapse_to_class_0(engine)
    metrics = engine.evaluate()
    gold = [f["labels"] for f in engine.task.eval]
    assert metrics["top_answer_share"] == 1.0 and metrics["accuracy"] == gold.count(0) / len(gold)
    engine.evaluate()  # still collapsed: said once, not at every evaluation
    warnings = [ev["message"] for ev in logs if ev["level"] == "warning"]
    assert (
        len(warnings) == 1 and f"{len(gold)} of the {len(gold)} evaluated examples got the same answer" in warnings[0]
    )
    assert (
        "collapsed to one class" in warnings[0] and "movement" not in warnings[0]
    )  # movement's own advice only under movement
    engine._say_if_collapsed({"top_answer_share": 0.7, "accuracy": 0.8, "eval_samples": 64})
    assert (
        "answers by its input again (the most common answer 70.0 % of 64)" in logs[-1]["message"]
        and not engine.collapsed
    )
