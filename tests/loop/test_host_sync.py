"""GPU-first, proven on the CPU: a plain step never asks the device for a value.

A ``TorchDispatchMode`` sees every aten op the step runs, autograd's and the optimizer's included, and counts the
ones that make the host wait for the device (``_local_scalar_dense`` is what ``.item()``, ``float()`` and ``bool()``
of a tensor become; ``nonzero`` and friends size their output from the data).  Statistics, evaluation and
checkpoint steps read values on purpose; every other step must count zero.
"""

from __future__ import annotations

import collections
import traceback

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from spu_engine.core.policy import FreezeRule, Policy
from spu_engine.loop.faults import UnwrittenState
from support import events_of

SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2"}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that wait for the device, with where they came from."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in SYNCING:
            frames = [f for f in traceback.extract_stack() if "site-packages/torch/" not in f.filename]
            self.where[f"{func.__name__} at " + " < ".join(f"{f.name}:{f.lineno}" for f in frames[-3:][::-1])] += 1
        return func(*args, **(kwargs or {}))


def _syncs_per_step(engine, steps: int) -> dict[int, collections.Counter]:
    """Drive the engine's own loop one step at a time (boundary, step, the evaluation or checkpoint it makes due)."""
    engine.unwritten = UnwrittenState()
    per_step = {}
    for _ in range(steps):
        counter = SyncCounter()
        with counter:
            engine.control.boundary()
            engine._one_step()
        per_step[engine.step] = counter.where
    return per_step


@pytest.mark.parametrize(
    ("arch", "policy"),
    [
        ("bert", Policy()),
        ("llama", Policy()),
        (
            "llama",
            Policy(
                freeze=[FreezeRule(units=["embeddings"], trainable=False), FreezeRule(layers=[0, 1], trainable=False)]
            ),
        ),
        ("llama", Policy(peft={"method": "lora", "r": 4})),
    ],
    ids=["bert-full", "llama-full", "llama-frozen-prefix", "llama-lora"],
)
def test_a_plain_step_makes_no_host_sync(make_engine, tmp_path, arch, policy):
    engine = make_engine(
        arch, policy=policy, run_dir=tmp_path / "run", steps=40, stats_every=7, eval_every=10, checkpoint_every=15
    )
    engine._begin()
    per_step = _syncs_per_step(engine, 20)
    reading = {s for s in per_step if s % 7 == 0 or s % 10 == 0 or s % 15 == 0}
    plain = {s: dict(where) for s, where in per_step.items() if s not in reading and where}
    assert plain == {}, plain
    assert any(per_step[s] for s in reading)  # the counter sees the syncs that are meant: it can fail
    engine.close()
    steps = events_of(tmp_path / "run", "step")  # every step said, in order, with its loss, though read a step late
    assert [e["step"] for e in steps] == list(range(1, 21)) and all(e["loss"] > 0 for e in steps)


def test_a_late_step_event_carries_the_values_a_settled_one_does(make_engine):
    late = make_engine(stats_every=100)
    said = []
    late.sinks.append(lambda _line, ev: said.append(ev) if ev["type"] == "step" else None)
    for _ in range(4):
        late.train_step(settled=False)
    assert [e["step"] for e in said] == [1, 2, 3]  # the fourth waits for the next step or the next event
    late.log("anything")
    settled = make_engine(stats_every=100)  # seeded alike at construction: the same dropout draws follow
    expected = [settled.train_step() for _ in range(4)]
    assert [(e["loss"], e["grad_norm"]) for e in said] == [(e["loss"], e["grad_norm"]) for e in expected]
