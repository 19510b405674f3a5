"""Selective backprop: backward on the selected samples only, with exactly their gradient."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from spu_engine.core.policy import Change
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.batching import BatchStream
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.methods.selective_backprop.method import SelectiveBackprop
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.lm import LMTask
from support import DATA, build_tiny

BS = 8


def no_dropout(tokenizer):
    return build_tiny("bert", tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def sb_of(engine) -> SelectiveBackprop:
    return next(m for m in engine.methods if isinstance(m, SelectiveBackprop))


def sb_policy(**settings):
    return parse_policy({"selective_backprop": settings})


def losses_of(model, task, indices: list[int]) -> torch.Tensor:
    """Per-sample losses computed here, without the engine."""
    device = next(model.parameters()).device  # bench/gpu.sh runs these on cuda
    batch = {k: v.to(device) for k, v in task.collate([task.train[i] for i in indices]).items()}
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def record_forwards(model) -> list[tuple[bool, tuple[int, ...]]]:
    """(grad enabled, input_ids shape) of every forward of ``model``."""
    seen: list[tuple[bool, tuple[int, ...]]] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append((torch.is_grad_enabled(), tuple(kw["input_ids"].shape))), with_kwargs=True
    )
    return seen


def test_gradient_equals_the_gradient_of_the_kept_subset_alone(make_engine, tokenizer):
    engine = make_engine("bert", model=no_dropout(tokenizer), batch_size=BS)
    reference = copy.deepcopy(engine.model)
    first = BatchStream(len(engine.task.train), seed=engine.config.seed).take(BS)  # what the engine draws first
    with torch.no_grad():
        losses = losses_of(reference, engine.task, first)
    threshold = float(losses.median())
    engine.apply_change(
        Change(set={"selective_backprop": {"mode": "threshold", "threshold": threshold}}), source="test"
    )

    loss, drawn, extra = sb_of(engine).forward_backward(engine)

    kept = [i for i, loss_i in zip(first, losses.tolist()) if loss_i >= threshold]
    assert 0 < len(kept) < BS
    assert sb_of(engine).last_backward == kept
    assert drawn == BS and extra["sb_backward"] == len(kept) and extra["sb_skipped"] == BS - len(kept)
    torch.testing.assert_close(loss.to(losses.device), losses.mean())
    losses_of(reference, engine.task, kept).mean().backward()
    full = copy.deepcopy(reference)
    full.zero_grad()
    losses_of(full, engine.task, first).mean().backward()
    differs = False
    for (name, p), q, f in zip(engine.model.named_parameters(), reference.parameters(), full.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            tolerance = (
                {"rtol": 1e-5, "atol": 1e-7} if p.device.type == "cpu" else {"rtol": 2e-4, "atol": 1e-6}
            )  # GPU kernels sum in another order
            torch.testing.assert_close(p.grad, q.grad, **tolerance, msg=name)
            differs = differs or not torch.allclose(p.grad, f.grad)
    assert differs, "the full batch would have given the same gradient: the test proves nothing"


def test_backward_runs_on_the_kept_samples_only(make_engine, tokenizer):
    engine = make_engine("bert", model=no_dropout(tokenizer), batch_size=BS)
    first = BatchStream(len(engine.task.train), seed=engine.config.seed).take(BS)
    with torch.no_grad():
        losses = losses_of(copy.deepcopy(engine.model), engine.task, first)
    top = losses.sort().values
    threshold = (
        float(top[-2] + top[-3]) / 2
    )  # keep the two hardest samples (halfway: a GPU's scoring pass may round the losses otherwise)
    engine.apply_change(
        Change(set={"selective_backprop": {"mode": "threshold", "threshold": threshold}}), source="test"
    )
    forwards = record_forwards(engine.model)
    engine.train_step()
    kept = sb_of(engine).last_backward
    longest = max(len(engine.task.train[i]["input_ids"]) for i in kept)
    assert forwards[0][0] is False and forwards[0][1][0] == BS  # scoring: all samples, no graph
    assert forwards[1:] == [(True, (2, longest))]  # one grad forward: the 2 kept samples, padded to their longest only


def test_a_batch_with_nothing_kept_changes_no_parameter(make_engine):
    engine = make_engine("bert", sb_policy(mode="threshold", threshold=1e6), batch_size=BS)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    fields = [engine.train_step() for _ in range(2)]
    assert engine.step == 2 and fields[-1]["step"] == 2  # the steps count: data consumed, schedule moved on
    assert fields[-1]["sb_kept_fraction"] == 0.0 and fields[-1]["sb_skipped"] == 2 * BS
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    assert not engine.optimizer.state  # no optimizer state was ever created


def test_percentile_mode_fills_full_backward_batches(make_engine):
    engine = make_engine("bert", sb_policy(mode="percentile", keep=0.5, floor=0.0), batch_size=BS)
    sb = sb_of(engine)
    drawn = selected = 0
    for _ in range(4):
        fields = engine.train_step()
        assert fields["sb_backward"] == BS and len(sb.last_backward) == BS
        assert len(sb.pool) < BS
        drawn_now = fields["samples"] - drawn
        selected += round(fields["sb_kept_fraction"] * drawn_now)
        drawn = fields["samples"]
    assert drawn >= 4 * BS and 0.3 < selected / drawn < 0.7
    assert fields["sb_skipped"] == drawn - selected


def test_keep_probability_is_cdf_to_the_beta_with_a_floor(make_engine):
    engine = make_engine("bert", sb_policy(mode="percentile", keep=0.25, floor=0.1, history=16))
    sb = sb_of(engine)
    sb.history = torch.arange(1.0, 13.0)  # 12 losses 1..12
    p = sb.keep_probability(torch.tensor([100.0, 0.5, 6.5, 11.5]))
    # history is now 1..12 plus the 4 new losses (16); CDF = share of history <= loss; beta = 1/0.25 - 1 = 3
    cdf = torch.tensor([16, 1, 8, 14]) / 16
    torch.testing.assert_close(p, torch.clamp(cdf**3, min=0.1))
    assert p[0] == 1.0 and p[1] == 0.1  # the biggest loser always, the easiest at the floor
    assert len(sb.history) == 16
    engine.apply_change(Change(set={"selective_backprop": {"keep": 1.0}}), source="test")
    assert torch.all(sb.keep_probability(torch.rand(5)) == 1.0)  # keep 1: beta 0, every sample


def test_state_round_trips_as_json_and_leaving_percentile_drops_the_pool(make_engine):
    engine = make_engine("bert", sb_policy(mode="percentile", keep=0.3), batch_size=BS)
    for _ in range(3):
        engine.train_step()
    sb = sb_of(engine)
    state = json.loads(json.dumps(sb.state_dict()))
    twin = sb_of(make_engine("bert", sb_policy(mode="percentile", keep=0.3), batch_size=BS))
    twin.load_state_dict(state)
    assert torch.equal(twin.history, sb.history) and twin.pool == sb.pool and twin.skipped == sb.skipped
    assert torch.equal(torch.rand(4, generator=twin.generator), torch.rand(4, generator=sb.generator))
    pooled, skipped = len(sb.pool), sb.skipped
    engine.apply_change(Change(set={"selective_backprop": {"mode": "off"}}), source="test")
    assert sb.pool == [] and sb.skipped == skipped + pooled and not sb.active
    assert "sb_kept_fraction" not in engine.train_step()


@pytest.mark.parametrize("arch", ["gpt2", "distilbert"])
def test_other_architectures(make_engine, arch):
    engine = make_engine(arch, sb_policy(mode="percentile", keep=0.5), batch_size=BS)
    fields = engine.train_step()
    assert fields["sb_backward"] == BS and fields["samples"] >= BS


def test_causal_lm_batches(tokenizer):
    """Per-token losses reduced per sample: selection and backward work on LM blocks too."""
    wiki = DATA / "wikitext2" / "wiki.valid.raw"
    task = LMTask.build(str(wiki), tokenizer, TaskOptions(max_length=16, max_train_samples=64, max_eval_samples=4))
    config = EngineConfig(
        model="tiny", data=str(wiki), task="lm", steps=5, batch_size=4, max_length=16, eval_every=0, warmup=0
    )
    policy = sb_policy(mode="percentile", keep=0.5)
    engine = Engine(config, policy, None, model=build_tiny("gpt2", tokenizer, "lm"), tokenizer=tokenizer, task=task)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    fields = engine.train_step()
    assert fields["sb_backward"] == 4 and fields["samples"] >= 4
    assert any(not torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
