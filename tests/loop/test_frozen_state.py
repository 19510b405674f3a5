"""Frozen tensors hold no optimizer state: after a live LoRA switch neither memory nor a checkpoint carries the base
model's AdamW moments; a tensor that trains again starts fresh, and a resume stays exact for what trains."""

from __future__ import annotations

import torch

from spu_engine.core.policy import Change, FreezeRule, Policy, TimelineEntry
from spu_engine.storage.checkpoint import latest_checkpoint, list_checkpoints


def saved_state_names(engine, folder) -> set[str]:
    """The stable names of the tensors whose AdamW state ``optimizer.pt`` holds (indices in the groups' order)."""
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    by_id = {id(p): n for n, p in engine.params.items()}
    order = [by_id[id(p)] for g in engine.optimizer.param_groups for p in g["params"]]
    return {order[i] for i in saved["state"]}


def test_a_checkpoint_after_a_live_lora_switch_holds_no_adamw_state_for_the_frozen_base(make_engine, tmp_path):
    engine = make_engine(steps=6, run_dir=tmp_path / "run")
    for _ in range(2):  # full fine-tuning: every tensor has moments
        engine.boundary()
        engine.train_step()
    base = set(engine.params)
    engine.apply_change(Change(set={"peft": {"method": "lora", "r": 2, "lr": 1e-3}}), "client")
    engine.boundary()
    engine.train_step()  # the step after the switch: the change can no longer be taken back
    engine.boundary()
    engine.train_step()
    engine.checkpoint_now()
    trains = {n for n, p in engine.params.items() if p.requires_grad}
    assert trains and not trains <= base  # LoRA's tensors (and the head) train
    held = saved_state_names(engine, latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert held == trains  # no moments of a frozen base tensor
    assert all(p.requires_grad for p in engine.optimizer.state)  # nor in memory


def test_a_tensor_frozen_then_trained_again_starts_with_fresh_moments_and_a_resume_matches(make_engine, tmp_path):
    policy = Policy(
        timeline=[
            TimelineEntry(step=2, freeze=[FreezeRule(layers=[0], trainable=False)]),
            TimelineEntry(step=5, freeze=[FreezeRule(layers=[0], trainable=True)]),
        ]
    )
    straight = make_engine(steps=8, run_dir=tmp_path / "a", policy=policy, checkpoint_every=4)
    straight.run()
    block0 = next(n for n in straight.params if ".layer.0." in n and n.endswith("weight"))
    assert int(straight.optimizer.state[straight.params[block0]]["step"]) == 3  # steps 5, 6, 7: counted afresh
    resumed = make_engine(steps=8, run_dir=tmp_path / "b", policy=policy)
    resumed.resume_from(list_checkpoints(tmp_path / "a" / "checkpoints")[0])
    assert resumed.step == 4
    resumed.run()
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
