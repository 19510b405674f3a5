"""The claims rule of bench/fidelity.py: a difference counts only beyond the seeds' spread and outside the paired
bootstrap's 95 % interval (issue 29 point 4)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from fidelity_claims import beats, within
from fidelity_stats import Seeds, difference


def run(seed: int, right: int, n: int = 872, shuffle: int = 0) -> dict:
    """A row's run answering ``right`` of ``n`` sentences right (which ones: ``shuffle``'s draw; 0: the first)."""
    order = list(range(n))
    random.Random(shuffle).shuffle(order) if shuffle else None
    correct = ["0"] * n
    for i in order[:right]:
        correct[i] = "1"
    return {
        "seed": seed,
        "accuracy": right / n,
        "correct": "".join(correct),
        "evals": [{"step": 1000, "accuracy": right / n, "train_s": 1.0}],
    }


def test_a_half_point_from_one_seed_is_not_a_claim():
    a, b = Seeds("a", [run(0, 770, shuffle=1)]), Seeds("b", [run(0, 766, shuffle=2)])  # 88.3 vs 87.8
    _, measured, verdict, why = beats("a beats b", ("a", a), ("b", b), "")
    assert verdict == "not shown" and "paired bootstrap over 872 sentences" in measured and "noise" in why


def test_a_gap_beyond_the_interval_and_the_spread_is_reproduced_and_one_inside_the_spread_is_not():
    a = Seeds("a", [run(s, 800 + s, shuffle=10 + s) for s in range(3)])
    b = Seeds("b", [run(s, 700 + s, shuffle=20 + s) for s in range(3)])
    assert difference(a, b).clear() and beats("a beats b", ("a", a), ("b", b), "")[2] == "reproduced"
    assert beats("b beats a", ("b", b), ("a", a), "it lost")[2:] == ("not reproduced", "it lost")
    # 2 points apart on average, but the seeds alone spread 4 points: not a claim
    wide = Seeds("c", [run(0, 820, shuffle=30), run(1, 750, shuffle=31), run(2, 790, shuffle=32)])
    narrow = Seeds("d", [run(s, 770 + s, shuffle=40 + s) for s in range(3)])
    d = difference(wide, narrow)
    assert d.spread == pytest.approx(wide.sd) and not d.clear()
    assert beats("c beats d", ("c", wide), ("d", narrow), "")[2] == "not shown"


def test_within_n_points_fails_only_beyond_the_noise():
    full = Seeds("full", [run(0, 766, shuffle=1)])
    close = Seeds("lora", [run(0, 760, shuffle=1)])  # 0.7 behind
    far = Seeds("bitfit", [run(0, 700, shuffle=1)])  # 7.6 behind
    assert within("close", ("lora", close), ("full", full), 1.0)[2] == "reproduced"
    assert within("far", ("bitfit", far), ("full", full), 1.0)[2] == "not reproduced"
    unsure = Seeds("ia3", [run(0, 745, shuffle=5)])  # 2.4 behind, answers drawn apart: inside the interval
    assert within("unsure", ("ia3", unsure), ("full", full), 1.0)[2] == "not shown"


def test_rows_without_recorded_answers_fall_back_to_the_binomial_error():
    a, b = Seeds("a", [{**run(0, 770), "correct": None}]), Seeds("b", [{**run(0, 700), "correct": None}])
    d = difference(a, b)
    assert (
        "binomial" in d.how
        and d.low > 0
        and d.high - d.low == pytest.approx(2 * 1.96 * ((770 * 102 + 700 * 172) / 872**3) ** 0.5)
    )


def test_the_pooling_hypothesis_holds_only_where_mean_pooling_learns_and_cls_collapsed():
    from fidelity_claims import pooling_hypothesis

    collapsed, learned = Seeds("movement90", [run(0, 444)]), Seeds("movement90-mean", [run(0, 700, shuffle=3)])
    assert pooling_hypothesis("movement 90 %", collapsed, learned)[2] == "reproduced"
    both = pooling_hypothesis("movement 90 %", collapsed, Seeds("m", [run(0, 444, shuffle=4)]))
    assert both[2:] == ("not reproduced", "the mean-pooling row collapses too: pooling is not the cause")
