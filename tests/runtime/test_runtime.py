"""The policy runtime stands alone: built from a model, an optimizer and explicit collaborators, it is its methods'
host and tells its owner of each change through its hooks, never by reaching into an engine."""

from __future__ import annotations

import pytest
import torch

from spu_engine.core.policy import Change, FreezeRule, Policy, PolicyError
from spu_engine.integrations import LoopConfig
from spu_engine.runtime.policy_runtime import PolicyRuntime, RuntimeHooks
from support import build_tiny


class Said:
    """A reporter that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.logs: list[tuple[str, str]] = []

    def emit(self, type_: str, **fields):
        self.events.append((type_, fields))

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append((level, message))


def runtime_on(tokenizer, calls: list) -> PolicyRuntime:
    model = build_tiny("bert", tokenizer)
    hooks = RuntimeHooks(
        applied=lambda change, source, before, names: calls.append(("applied", source, before)),
        taken=lambda before: calls.append(("taken", before)),
    )
    runtime = PolicyRuntime(
        model,
        torch.optim.AdamW(model.parameters()),
        LoopConfig(),
        reporter=Said(),
        clock=lambda: 7,
        steps_per_epoch=None,
        hooks=hooks,
    )
    runtime.adopt(Policy())
    runtime.put_in_force()
    return runtime


def test_a_change_is_taken_then_handed_to_the_owner(tokenizer):
    calls: list = []
    runtime = runtime_on(tokenizer, calls)
    assert all(m.host is runtime for m in runtime.methods)
    before = runtime.current
    trained = {n for n, p in runtime.params.items() if p.requires_grad}
    runtime.apply_change(Change(freeze=[FreezeRule(layers=[0], trainable=False)]), source="test")
    assert calls == [("taken", trained), ("applied", "test", before)]
    assert runtime.current != before and runtime.trainable_count() < sum(p.numel() for p in runtime.params.values())


def test_a_refused_change_leaves_everything_and_the_owner_hears_none_was_taken(tokenizer):
    calls: list = []
    runtime = runtime_on(tokenizer, calls)
    before = runtime.current
    with pytest.raises(PolicyError):
        runtime.apply_change(Change(set={"peft": {"method": "no-such-method"}}), source="test")
    assert calls == [("taken", None)] and runtime.current == before
