"""Device memory in the what-if: weights, gradients and optimizer state counted exactly (on CPU, against the tensors a
real step made), activations measured and scaled by what trains, a LoRA rank that grows the figure, and a change
that would not fit flagged."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.memory_view import memory_line, size
from spu_engine.core.policy import Change, FreezeRule
from spu_engine.core.protocol import MemoryPreview
from spu_engine.runtime import memory_estimate

PREFIX = Change(freeze=[FreezeRule(units=["embeddings", "block0", "block1"], trainable=False)])
UNFREEZE = Change(freeze=[FreezeRule(match="*", trainable=True)])


def held_by_a_step(engine) -> dict[str, int]:
    """Bytes of every parameter and buffer, of the optimizer's state, and of the gradients one forward and backward
    make: what the estimate must find."""
    model = engine.model
    loss = engine.per_sample_loss(engine.next_batch()).mean()
    engine.backward(loss)
    held = {
        "weights": sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers()),
        "gradients": sum(p.grad.nbytes for p in model.parameters() if p.grad is not None),
        "optimizer": sum(t.nbytes for s in engine.optimizer.state.values() for t in s.values()),
    }
    engine.optimizer.zero_grad(set_to_none=True)
    return held


def kinds(figures: dict) -> dict[str, int]:
    return {k: sum(figures[k].values()) for k in ("weights", "gradients", "optimizer")}


def test_weights_gradients_and_adamw_state_are_counted_exactly_before_and_after(make_engine):
    engine = make_engine("bert")
    engine.apply_change(PREFIX, "test")
    engine.train_step()  # AdamW state now exists for the tensors above the frozen prefix only
    now = engine.preview(Change())["memory"]
    assert kinds(now["before"]) == held_by_a_step(engine)
    assert now["before"]["activations"] > 0 and now["measured_step"] == 1 and now["where"] == "RAM"
    assert now["before"]["total"] == sum(kinds(now["before"]).values()) + now["before"]["activations"]

    after = engine.preview(UNFREEZE)["memory"]["after"]  # the prefix starts training: gradients and new moments
    engine.apply_change(UNFREEZE, "test")
    engine.train_step()
    assert kinds(after) == held_by_a_step(engine)  # what the preview said before the change is what it took


def test_a_tensor_frozen_after_training_gives_up_its_adamw_state_in_the_figure(make_engine):
    engine = make_engine("bert")
    engine.train_step()
    freeze = engine.preview(PREFIX)["memory"]
    assert sum(freeze["after"]["optimizer"].values()) < sum(freeze["before"]["optimizer"].values())
    assert sum(freeze["after"]["gradients"].values()) < sum(freeze["before"]["gradients"].values())
    engine.apply_change(PREFIX, "test")
    engine.train_step()
    engine.train_step()  # the state of what froze goes after the step that follows the change
    assert kinds(freeze["after"]) == held_by_a_step(engine)


def test_activations_scale_down_with_a_frozen_prefix_as_measured(make_engine):
    engine = make_engine("bert")
    engine.train_step()
    full = engine.runtime.memory.meter.latest
    assert full.how == "saved tensors" and full.depth == 1.0 and full.bytes > 0
    estimate = engine.preview(PREFIX)["memory"]["after"]["activations"]
    assert estimate == pytest.approx(full.bytes / 2)  # blocks 2-3 of 4 still need a backward
    engine.apply_change(PREFIX, "test")
    engine.train_step()  # the first step after a change is measured
    frozen = engine.runtime.memory.meter.latest
    assert frozen.step == 2 and frozen.depth == 0.5
    assert frozen.bytes == pytest.approx(estimate, rel=0.1)  # the estimate is what the step then saved
    head_only = Change(freeze=[FreezeRule(match="*", trainable=False), FreezeRule(units=["head"], trainable=True)])
    assert engine.preview(head_only)["memory"]["after"]["activations"] == 0  # no block needs a backward


def test_blocks_no_step_measured_are_estimated_from_the_models_shape(make_engine, monkeypatch):
    head_only = Change(freeze=[FreezeRule(match="*", trainable=False), FreezeRule(units=["head"], trainable=True)])
    engine = make_engine("bert")
    engine.apply_change(head_only, "test")
    engine.train_step()
    measured = engine.runtime.memory.meter.latest
    samples, length = measured.batch
    assert measured.depth == 0 and samples == 8
    block = samples * length * 32 * (34 + 5 * 4 * length / 32) * 4 / 2  # hidden 32, 4 heads, fp32
    estimate = engine.preview(UNFREEZE)["memory"]["after"]["activations"]
    assert estimate == round(measured.bytes + 4 * block)
    engine.apply_change(UNFREEZE, "test")
    engine.train_step()
    assert engine.runtime.memory.meter.latest.bytes == pytest.approx(estimate, rel=0.1)  # an estimate (1 % off here)
    engine.apply_change(head_only, "test")
    engine.train_step()
    with_checkpointing = Change(freeze=UNFREEZE.freeze, set={"memory": {"gradient_checkpointing": True}})
    checkpointed = engine.preview(with_checkpointing)["memory"]
    assert checkpointed["checkpointing"] and checkpointed["after"]["activations"] < estimate / 4
    engine.apply_change(with_checkpointing, "test")
    engine.train_step()  # measured under checkpointing now: the shape's estimate was of the same order
    measured = engine.runtime.memory.meter.latest.bytes
    assert checkpointed["after"]["activations"] / 2 <= measured <= checkpointed["after"]["activations"] * 2


def test_micro_batches_divide_the_activations_a_step_holds(make_engine):
    engine = make_engine("bert", batch_size=16)
    engine.train_step()
    now = engine.preview(Change(set={"memory": {"grad_accum": 1}}))["memory"]["after"]["activations"]
    four = engine.preview(Change(set={"memory": {"grad_accum": 4}}))["memory"]["after"]["activations"]
    assert four == pytest.approx(now / 4, rel=0.01)
    engine.apply_change(Change(set={"memory": {"grad_accum": 4}}), "test")
    engine.train_step()  # measured in micro-batches: less, as each pads only to its own longest example
    again = engine.preview(Change(set={"memory": {"grad_accum": 4}}))["memory"]["after"]["activations"]
    assert four / 2 <= again <= four


def test_a_lora_rank_increase_shows_a_larger_after_figure(make_engine):
    engine = make_engine("bert")
    engine.apply_change(Change(set={"peft": {"method": "lora", "r": 8}}), "test")
    engine.train_step()
    lora = [p for n, p in engine.params.items() if ".lora_" in n]
    memory = engine.preview(Change(set={"peft": {"r": 64}}))["memory"]
    grown = sum(p.numel() for p in lora) * 7 * 4  # every LoRA factor 8x as wide, fp32
    assert memory["after"]["weights"]["fp32"] - memory["before"]["weights"]["fp32"] == grown
    assert memory["after"]["gradients"]["fp32"] - memory["before"]["gradients"]["fp32"] == grown
    assert memory["after"]["total"] > memory["before"]["total"]
    line = memory_line(MemoryPreview.model_validate(memory))
    assert line.startswith("RAM ") and " → " in line and "AdamW" in line and "from step 1" in line


def test_a_lora_rank_change_on_a_tiny_llama_lm_carries_the_memory_line(tokenizer):
    from spu_engine.loop.engine import Engine, EngineConfig
    from support import WIKI, build_tiny

    config = EngineConfig(model="tiny", data=str(WIKI), steps=3, batch_size=2, max_length=16, max_train_samples=8)
    engine = Engine(config, None, model=build_tiny("llama", tokenizer, "lm"), tokenizer=tokenizer)
    engine.apply_change(Change(set={"peft": {"method": "lora", "r": 8}}), "test")
    engine.train_step()
    memory = engine.preview(Change(set={"peft": {"r": 64}}))["memory"]
    assert memory["after"]["total"] > memory["before"]["total"] and memory["before"]["activations"] > 0
    assert "→" in memory_line(MemoryPreview.model_validate(memory))


def test_a_change_over_the_free_memory_is_flagged(make_engine, monkeypatch):
    engine = make_engine("bert")
    engine.apply_change(PREFIX, "test")
    engine.train_step()
    before = engine.preview(Change())["memory"]["before"]
    resident = sum(before["weights"].values()) + sum(before["optimizer"].values())

    class Tight:  # the machine has room for what a step adds now, and no more
        available = sum(before["gradients"].values()) + before["activations"]

    monkeypatch.setattr(memory_estimate.psutil, "virtual_memory", lambda: Tight())
    fits = engine.preview(Change(set={"peft": {"method": "bitfit"}}))["memory"]  # less to train
    assert fits["fits"] and fits["available"] == Tight.available + resident
    unfreeze = engine.preview(UNFREEZE)["memory"]  # gradients and new moments for the prefix
    assert unfreeze["fits"] is False
    line = memory_line(MemoryPreview.model_validate(unfreeze))
    short = unfreeze["after"]["total"] - unfreeze["available"]
    assert line.splitlines()[1].startswith("would not fit: ") and f"({size(short)} short)" in line


def test_the_first_preview_says_activations_are_not_measured_yet(make_engine):
    engine = make_engine("bert")
    memory = engine.preview(PREFIX)["memory"]
    assert memory["before"]["activations"] is None and memory["measured_step"] is None
    assert "activations not measured yet" in memory_line(MemoryPreview.model_validate(memory))


def test_on_cuda_the_activations_are_the_steps_peak_less_what_it_began_and_made(make_engine, monkeypatch):
    """No GPU here: torch.cuda's allocator readers stand in for a step that peaks 700 bytes over its start."""
    from spu_engine.runtime.activation_meter import ActivationMeter

    engine = make_engine("bert")
    allocated = {"now": 1000, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    meter = ActivationMeter(engine.model)
    head = engine.params["classifier.weight"]
    with meter.measuring(step=3, depth=1.0, keep=1.0, device=torch.device("cuda")):
        allocated["peak"] = 1700
        head.grad = torch.zeros_like(head)  # its gradient, made meanwhile
    assert meter.latest.bytes == 700 - head.grad.nbytes and meter.latest.how == "peak" and meter.latest.step == 3
