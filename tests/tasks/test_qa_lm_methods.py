"""The selective-update methods run on QA and LM batches, for encoder and decoder models."""

from __future__ import annotations

import math

import pytest

from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions, get_task
from support import DATA, build_tiny

CASES = [
    (
        "gpt2",
        "lm",
        {
            "selective_backprop": {"mode": "percentile", "keep": 0.5},
            "pruning": {
                "method": "magnitude",
                "targets": ["*.mlp.c_fc.weight"],
                "schedule": {"start_step": 0, "end_step": 2, "every": 1, "final_sparsity": 0.5},
            },
        },
    ),
    ("gpt2", "lm", {"peft": {"method": "lora", "r": 2}}),
    (
        "distilbert",
        "qa",
        {
            "selective_backprop": {"mode": "threshold", "threshold": 4.0},
            "pruning": {
                "method": "movement",
                "targets": ["*.ffn.lin1.weight"],
                "schedule": {"start_step": 0, "end_step": 2, "every": 1, "final_sparsity": 0.5},
            },
        },
    ),
    ("distilbert", "qa", {"peft": {"method": "ia3"}}),
    ("gpt2", "qa", {"peft": {"method": "bitfit"}}),
]


@pytest.fixture(scope="module")
def tasks(tokenizer):
    return {
        "lm": get_task("lm").build(
            str(DATA / "wikitext2"), tokenizer, TaskOptions(max_length=32, max_train_samples=64, max_eval_samples=8)
        ),
        "qa": get_task("qa").build(
            str(DATA / "squad"), tokenizer, TaskOptions(max_length=64, max_train_samples=64, max_eval_samples=8)
        ),
    }


@pytest.mark.parametrize("arch,name,policy", CASES, ids=[f"{a}-{n}-{'+'.join(p)}" for a, n, p in CASES])
def test_method_trains_on_task(tokenizer, tasks, arch, name, policy):
    steps: list[dict] = []
    config = EngineConfig(
        model="tiny", data="unused", task=name, steps=3, batch_size=8, eval_every=0, warmup=0, lr=1e-3
    )
    engine = Engine(
        config,
        parse_policy(policy),
        model=build_tiny(arch, tokenizer, name),
        tokenizer=tokenizer,
        task=tasks[name],
        sinks=[lambda _line, ev: steps.append(ev) if ev["type"] == "step" else None],
    )
    total = sum(p.numel() for p in engine.model.parameters())
    assert engine.run() == "finished" and len(steps) == 3
    last = steps[-1]
    assert math.isfinite(last["loss"])
    if "selective_backprop" in policy:
        assert last["sb_skipped"] > 0 and last["sb_kept_fraction"] < 1  # some drawn samples had no backward
    if "pruning" in policy:
        assert last["pruning"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    if "peft" in policy:
        assert 0 < last["trainable"] < total / 50
    metrics = engine.evaluate()
    assert metrics[tasks[name].metric] >= 0 and math.isfinite(metrics["eval_loss"])
