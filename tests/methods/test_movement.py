"""Movement and soft movement as the reference (Sanh et al.'s movement-pruning project) does them, on tiny models:
the dense score warm-up, pruned weights that do not learn while their scores do, soft movement's L1 schedule."""

from __future__ import annotations

import pytest
import torch

from support import collapse_to_class_0, method_of, pruning_policy, run_steps


def test_movement_scores_learn_while_the_warm_up_holds_sparsity_at_zero(make_engine):
    """The scores train from the first step; the first mask waits for the warm-up, and it is theirs."""
    engine = make_engine(
        policy=pruning_policy(
            "movement",
            schedule={"start_step": 0, "end_step": 1000, "every": 1, "final_sparsity": 0.5},
            movement={"warmup": 0.25, "final_hold": 0.25},
        ),
        steps=20,
    )
    pm = method_of(engine)
    assert (pm.pruner.ramp.start, pm.pruner.ramp.end) == (5, 15)  # a quarter of the run each side
    scores = pm.pruner.score_params
    for step in range(5):
        before = {n: s.detach().clone() for n, s in scores.items()}
        engine.train_step()
        assert pm.sparsity() == 0.0 and pm.stats(engine.step)["pruning"]["target"] == 0.0, step
        assert all(not torch.equal(scores[n], before[n]) for n in scores), step  # every tensor's scores moved
    run_steps(engine, 2)  # steps 5 (ramp start: 0 %) and 6 (the first mask)
    want = 0.5 * (1 - (1 - 1 / 10) ** 3)
    assert pm.sparsity() == pytest.approx(want, abs=1e-3) and pm.sparsity() > 0
    run_steps(engine, 13)
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-3)  # held from step 15 to the run's end


def test_a_pruned_weight_and_its_adam_moments_stay_put_while_its_score_moves(make_engine):
    engine = make_engine(
        policy=pruning_policy(
            "movement", schedule={"kind": "constant", "end_step": 0, "every": 1000, "final_sparsity": 0.5}
        )
    )
    pm = method_of(engine)
    run_steps(engine, 2)  # masks at step 0; the optimizer holds moments from step 0 on
    assert pm.sparsity() == pytest.approx(0.5, abs=1e-3)

    def snapshot():
        out = {}
        for n in pm.targets:
            state = engine.optimizer.state[engine.params[n]]
            out[n] = (
                pm.masks.dense(n).clone(),
                state["exp_avg"].clone(),
                state["exp_avg_sq"].clone(),
                pm.pruner.score_params[n].detach().clone(),
            )
        return out

    before = snapshot()
    run_steps(engine, 3)
    after = snapshot()
    for n in pm.targets:
        pruned = ~pm.masks.keep(n)
        for i, what in enumerate(("value", "exp_avg", "exp_avg_sq")):
            assert torch.equal(after[n][i][pruned], before[n][i][pruned]), (n, what)
            assert not torch.equal(after[n][i][~pruned], before[n][i][~pruned]), (n, what)  # kept weights learn
        assert (engine.params[n][pruned] == 0).all()
        assert (after[n][3][pruned] != before[n][3][pruned]).float().mean() > 0.9, n  # while their scores learn


def test_soft_movement_l1_grows_along_the_ramp(make_engine):
    """The L1 pull on the scores is l1 times the ramp's progress: none in the warm-up, all of it from the end step;
    each matrix's scores share one mean, and the matrices' means are averaged (the reference's regularization)."""
    l1 = 50.0
    engine = make_engine(
        policy=pruning_policy(
            "soft_movement", schedule={"start_step": 3, "end_step": 7, "every": 1}, movement={"l1": l1}
        ),
        grad_clip=0.0,
    )
    pm = method_of(engine)
    scores = pm.pruner.score_params
    penalties = []

    def capture(*_):
        gap = []
        for n, s in scores.items():
            straight = engine.params[n].grad * pm.masks.dense(n)
            sig = torch.sigmoid(s.detach())
            gap.append(((s.grad - straight) / (sig * (1 - sig) / (s.numel() * len(scores)))).flatten())
        penalties.append(torch.cat(gap))

    engine.optimizer.register_step_pre_hook(capture)
    run_steps(engine, 9)
    for step, weight in enumerate(penalties):
        want = l1 * pm.pruner.ramp.progress(step)
        assert weight.cpu() == pytest.approx(torch.full_like(weight.cpu(), want), rel=1e-3, abs=1e-3), step
    assert [pm.pruner.ramp.progress(t) for t in (0, 2, 3, 7, 8)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_a_collapse_under_movement_pruning_says_movement_does_not_come_back(make_engine):
    engine = make_engine(
        policy=pruning_policy("movement", schedule={"start_step": 0, "end_step": 10, "every": 1, "final_sparsity": 0.5})
    )
    logs = collapse_to_class_0(engine)
    engine.evaluate()
    warning = next(ev["message"] for ev in logs if ev["level"] == "warning")
    assert "collapsed to one class" in warning and "movement pruning does not come back from this" in warning
