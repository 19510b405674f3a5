"""SPU's movement pruners against the reference's masked layers (``movement_reference``), step by step.

A tiny BERT trains twice from the same weights on the same batches: through SPU's engine with the policy that
maps onto the reference's settings, and through the reference's layers in a plain loop.  Scores, masks and losses
must agree at every step; where they do not, the failure names the first step and tensor that differ.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from movement_reference import Departures, Settings, Step, train

from spu_engine.core.policy_files import parse_policy
from support import build_tiny, method_of

STEPS = 24
LR, SCORE_LR, WEIGHT_DECAY = 1e-3, 1e-2, 0.01
INITIAL_WARMUP, FINAL_WARMUP = 4, 6  # steps


def spu_policy(s: Settings) -> dict:
    """The SPU policy that does what the reference does with ``s``: scores per matrix (``per_layer``), masks every
    step, the ramp from ``initial_warmup`` to ``steps - final_warmup`` with no SPU warm-up fractions on top."""
    schedule = {"kind": "cubic", "start_step": s.initial_warmup, "end_step": s.steps - s.final_warmup, "every": 1}
    movement = {"score_lr": s.score_lr, "warmup": 0.0, "final_hold": 0.0}
    if s.soft:
        movement.update(threshold=s.initial_threshold, final_threshold=s.final_threshold, l1=s.final_lambda)
    else:  # the reference's threshold is the kept fraction
        schedule.update(initial_sparsity=1 - s.initial_threshold, final_sparsity=1 - s.final_threshold)
    method = "soft_movement" if s.soft else "movement"
    return {"pruning": {"method": method, "scope": "per_layer", "schedule": schedule, "movement": movement}}


def run_spu(make_engine, model, s: Settings) -> tuple[list[Step], list[dict]]:
    """SPU's run: each step's task loss, scores after the update, masks in force; and the batches it drew."""
    engine = make_engine(
        policy=parse_policy(spu_policy(s)),
        model=copy.deepcopy(model),
        steps=s.steps,
        lr=s.lr,
        weight_decay=s.weight_decay,
        grad_clip=s.max_grad_norm,
        stats_every=10_000,  # per-unit statistics every step would triple the test's time
        device="cpu",  # the reference runs on the CPU: one device's arithmetic on both sides
    )
    trainer, pm = engine.trainer, method_of(engine)
    batches, losses = [], []
    draw, loss_of = trainer.next_batch, trainer.per_sample_loss

    def recorded_draw(n=None):
        batches.append(draw(n))
        return batches[-1]

    def recorded_loss(batch):
        losses.append(loss_of(batch))
        return losses[-1]

    trainer.next_batch, trainer.per_sample_loss = recorded_draw, recorded_loss
    steps = []
    for _ in range(s.steps):
        engine.train_step()
        masks = {
            n: pm.masks.keep(n).clone() if n in pm.masks.masks else torch.ones_like(p, dtype=torch.bool)
            for n, p in pm.pruner.score_params.items()
        }
        scores = {n: p.detach().clone() for n, p in pm.pruner.score_params.items()}
        steps.append(Step(losses[-1].mean().item(), scores, masks))
    return steps, batches


def first_difference(spu: list[Step], ref: list[Step], tol: float = 1e-5) -> str | None:
    """The first step, tensor and what differs between the two runs; None if they agree throughout."""
    for step, (a, b) in enumerate(zip(spu, ref, strict=True)):
        if sorted(a.scores) != sorted(b.scores):
            return f"step {step}: SPU prunes {sorted(a.scores)}, the reference {sorted(b.scores)}"
        for n in a.masks:
            if not torch.equal(a.masks[n], b.masks[n]):
                kept = int(a.masks[n].sum()), int(b.masks[n].sum())
                apart = int((a.masks[n] != b.masks[n]).sum())
                return (
                    f"step {step}: mask of {n}: SPU keeps {kept[0]}, the reference {kept[1]} ({apart} entries differ)"
                )
        if abs(a.loss - b.loss) > tol * max(1.0, abs(b.loss)):
            return f"step {step}: loss: SPU {a.loss:.7f}, the reference {b.loss:.7f}"
        for n in a.scores:
            gap = float((a.scores[n] - b.scores[n]).abs().max())
            if gap > tol * max(1.0, float(b.scores[n].abs().max())):
                return f"step {step}: scores of {n} differ by up to {gap:.3g}"
    return None


@pytest.fixture
def tiny_bert(tokenizer):
    return build_tiny("bert", tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def settings(**over) -> Settings:
    """Hard movement to 30 % kept, gradients clipped hard enough that every step clips; SPU's departures on."""
    base = Settings(
        steps=STEPS,
        lr=LR,
        score_lr=SCORE_LR,
        initial_threshold=1.0,
        final_threshold=0.3,
        initial_warmup=INITIAL_WARMUP,
        final_warmup=FINAL_WARMUP,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=0.05,
        departures=Departures.spu(),
    )
    return replace(base, **over)


def soft(**over) -> Settings:
    """Soft movement: the threshold on sigmoid(score) from 0 to 0.5, L1 that prunes about 80 % by the end."""
    return settings(soft=True, initial_threshold=0.0, final_threshold=0.5, final_lambda=0.02, **over)


SPU_RUNS: dict[str, tuple[list[Step], list[dict]]] = {}  # SPU's runs by settings: departures change only the reference


def compare(make_engine, model, s: Settings) -> tuple[str | None, list[Step]]:
    key = repr(replace(s, departures=Departures()))
    if key not in SPU_RUNS:
        SPU_RUNS[key] = run_spu(make_engine, model, s)
    spu, batches = SPU_RUNS[key]
    return first_difference(spu, train(model, batches, s)[0]), spu


def kept(step: Step) -> float:
    return sum(int(m.sum()) for m in step.masks.values()) / sum(m.numel() for m in step.masks.values())


def test_movement_agrees_with_the_reference_step_by_step(make_engine, tiny_bert):
    """TopK of each matrix's scores, scores from 0 with their own lr, the cubic with both warm-ups: SPU's movement
    pruner under the mapped policy is the reference's, up to its deliberate departures (all on here)."""
    difference, spu = compare(make_engine, tiny_bert, settings())
    assert difference is None, difference
    assert kept(spu[INITIAL_WARMUP]) == 1.0 and kept(spu[INITIAL_WARMUP + 1]) < 1.0  # the comparison covers the ramp
    assert kept(spu[-1]) == pytest.approx(0.3, abs=1e-3)


def test_soft_movement_agrees_with_the_reference_step_by_step(make_engine, tiny_bert):
    """The threshold on sigmoid(score) along the reference's cubic, the L1 of each matrix's mean scaled by
    threshold / final_threshold: SPU's soft movement with movement.final_threshold is the reference's."""
    difference, spu = compare(make_engine, tiny_bert, soft())
    assert difference is None, difference
    assert kept(spu[INITIAL_WARMUP]) == 1.0 and 0.05 < kept(spu[-1]) < 0.95  # the threshold did prune


@pytest.mark.parametrize(
    ("departure", "differs"),
    [("round_count", "mask of"), ("hold_pruned", "scores of"), ("clip_model_only", "scores of")],
)
def test_each_departure_is_where_spu_and_the_reference_part(make_engine, tiny_bert, departure, differs):
    """With one of SPU's documented departures turned back to the reference's way, the runs part, and the first
    difference is the one the README describes (a mask's count, or scores that moved another way)."""
    departures = Departures.spu()
    setattr(departures, departure, False)
    difference, _ = compare(make_engine, tiny_bert, settings(departures=departures))
    assert difference is not None and differs in difference, difference
