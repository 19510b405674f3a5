"""The compose matrix on two ranks: A then B, each sent live over the socket to a sharded run (torchrun, gloo), for
the changes that touch training most (a tensor freeze, LoRA, magnitude pruning, LISA, selective backprop).  B is
applied, or refused with a message and nothing changed; and the run's recorded policy, replayed by one process with
the global batch, ends with the same weights and the same per-step losses.  Every ordered pair is slow; two run by
default (with ``test_sharded``'s five-change policy, the rest is covered there)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from ranks_support import (
    ENV,
    NO_TORCHRUN,
    assert_same_model,
    run,
    step_losses,
    tiny_folders,
    train_args,
    two_ranks,
    weights,
)

from spu_engine.core.transport import EngineClient

pytestmark = [pytest.mark.process, NO_TORCHRUN]

CHANGES = {
    "freeze_tensor": {"freeze": [{"match": "bert.encoder.layer.0.attention.self.query.weight", "trainable": False}]},
    "lora": {"set": {"peft": {"method": "lora", "r": 2}}},  # planned with --plan-peft lora and the policy's r 2
    "magnitude": {
        "set": {"pruning": {"method": "magnitude", "schedule": {"start_step": 0, "end_step": 4, "every": 1}}}
    },
    "lisa": {"set": {"auto_freeze": {"method": "lisa", "interval": 2, "n_layers": 1}}},
    "sb_percentile": {"set": {"selective_backprop": {"mode": "percentile", "keep": 0.5}}},
}
PAIRS = [(a, b) for a, b in itertools.product(CHANGES, CHANGES) if a != b]
QUICK = [("lora", "magnitude"), ("sb_percentile", "lisa")]
STEPS = 10


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tokenizer):
    return tiny_folders(tmp_path_factory, tokenizer)["bert"]


def _pair(bert, a: str, b: str, tmp_path, port: int) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("spu_policy: 1\npeft: {method: none, r: 2}\n")
    two = tmp_path / "two"
    cmd = [*two_ranks(port), *train_args(bert, "bert", two, 4, STEPS, policy, "--plan-peft", "lora")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = EngineClient(two / "control.sock").connect(timeout=120)
        client.wait_for(lambda e: e["type"] == "step" and e["step"] >= 1, 120)
        acks = []
        for name in (a, b):
            cid = client.send("change", change=CHANGES[name])
            acks.append(client.wait_for(lambda e, cid=cid: e["type"] == "ack" and e["id"] == cid, 60))
        client.close()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-6000:]
    assert acks[0]["ok"], acks[0]
    assert acks[1]["ok"] or acks[1].get("message"), acks[1]  # refused only with a reason
    one = tmp_path / "one"
    run([sys.executable, *train_args(bert, "bert", one, 8, STEPS, two / "policy.yaml")])
    final = f"checkpoints/step-{STEPS:07d}"
    assert_same_model(weights(one / final), weights(two / final))
    assert step_losses(two) == pytest.approx(step_losses(one), abs=2e-5)


@pytest.mark.parametrize("a, b", QUICK, ids=[f"{a}-then-{b}" for a, b in QUICK])
def test_two_ranks_quick_pairs(bert, a, b, tmp_path):
    _pair(bert, a, b, tmp_path, 29580 + QUICK.index((a, b)))


@pytest.mark.slow
@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_two_ranks_every_pair(bert, a, b, tmp_path):
    _pair(bert, a, b, tmp_path, 29590 + PAIRS.index((a, b)))
