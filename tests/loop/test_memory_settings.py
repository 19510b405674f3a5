"""memory: micro-batches and gradient checkpointing change what a step holds, never what it computes."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, FreezeRule, Policy, PolicyError
from support import build_tiny

NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "llama": {},
}


def _weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_four_micro_batches_of_8_equal_one_batch_of_32(make_engine, tokenizer, arch):
    runs = []
    for accum in (1, 4):
        model = build_tiny(arch, tokenizer, **NO_DROPOUT[arch])
        engine = make_engine(arch, model=model, batch_size=32, policy=Policy(memory={"grad_accum": accum}))
        fields = [engine.train_step() for _ in range(5)]
        runs.append(
            ([f["loss"] for f in fields], _weights(engine), (fields[-1]["batch_size"], fields[-1]["micro_batch"]))
        )
    (losses1, weights1, sizes1), (losses4, weights4, sizes4) = runs
    assert (sizes1, sizes4) == ((32, 32), (32, 8))  # the step event says both sizes
    assert losses1 == pytest.approx(losses4, abs=1e-5)
    for name, w in weights1.items():
        assert torch.allclose(w, weights4[name], atol=1e-5, rtol=0), name


def test_selective_backprop_selects_over_the_whole_accumulated_batch(make_engine, tokenizer):
    runs = []
    for accum in (1, 4):
        model = build_tiny("bert", tokenizer, **NO_DROPOUT["bert"])
        policy = Policy(selective_backprop={"mode": "percentile", "keep": 0.5}, memory={"grad_accum": accum})
        engine = make_engine(model=model, batch_size=16, policy=policy)
        fields = [engine.train_step() for _ in range(3)]
        runs.append(([(f["loss"], f["sb_backward"]) for f in fields], _weights(engine)))
    assert [b for _, b in runs[0][0]] == [b for _, b in runs[1][0]]  # the same samples kept
    assert [loss for loss, _ in runs[0][0]] == pytest.approx([loss for loss, _ in runs[1][0]], abs=1e-5)
    for name, w in runs[0][1].items():
        assert torch.allclose(w, runs[1][1][name], atol=1e-5, rtol=0), name


def _saved_activation_bytes(engine) -> int:
    """Bytes autograd keeps for backward during one step's forward, the model's own weights left out."""
    weights = {p.data_ptr() for p in engine.model.parameters()}
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved[0] += t.numel() * t.element_size()
        return t

    batch = engine.batch_of(list(range(16)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine.per_sample_loss(batch).mean()
    loss.backward()
    engine.optimizer.zero_grad(set_to_none=True)
    return saved[0]


def test_checkpointing_halves_saved_activations_and_a_frozen_prefix_saves_its_share(make_engine, tokenizer):
    def measure(policy: Policy) -> int:
        engine = make_engine("llama", model=build_tiny("llama", tokenizer), policy=policy)
        engine.train_step()  # the switch happens at a step boundary
        return _saved_activation_bytes(engine)

    full = measure(Policy())
    checkpointed = measure(Policy(memory={"gradient_checkpointing": True}))
    prefix = [FreezeRule(units=["embeddings"], trainable=False), FreezeRule(layers=[0, 1], trainable=False)]
    frozen = measure(Policy(freeze=prefix))
    both = measure(Policy(freeze=prefix, memory={"gradient_checkpointing": True}))
    assert checkpointed <= full / 2, (checkpointed, full)
    assert frozen <= full * 0.6, (frozen, full)  # two of four blocks store nothing (the head's share stays)
    assert both <= checkpointed and both <= frozen


def test_checkpointing_switched_live_gives_the_same_losses(make_engine, tokenizer):
    plain = make_engine("llama", model=build_tiny("llama", tokenizer))
    switched = make_engine("llama", model=build_tiny("llama", tokenizer))
    said = []
    switched.sinks.append(lambda _line, ev: said.append(ev.get("message", "")) if ev["type"] == "log" else None)
    losses = {"plain": [], "switched": []}
    for step in range(6):
        if step == 2:
            switched.apply_change(Change(set={"memory": {"gradient_checkpointing": True}}), source="test")
        if step == 4:
            switched.apply_change(Change(set={"memory": {"gradient_checkpointing": False}}), source="test")
        losses["plain"].append(plain.train_step()["loss"])
        losses["switched"].append(switched.train_step()["loss"])
        assert switched.trainer.checkpointing.on == (2 <= step < 4)
    assert losses["switched"] == pytest.approx(losses["plain"], abs=1e-6)
    assert "step 2: gradient checkpointing on" in said and "step 4: gradient checkpointing off" in said


def test_a_model_without_checkpointing_is_refused_by_name(make_engine, tokenizer):
    engine = make_engine()
    engine.model.supports_gradient_checkpointing = False
    with pytest.raises(PolicyError, match=r"memory.gradient_checkpointing: .* has no gradient checkpointing"):
        engine.apply_change(Change(set={"memory": {"gradient_checkpointing": True}}), source="test")
    assert engine.current.memory.gradient_checkpointing is False
