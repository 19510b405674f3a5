"""The packages' import graphs have no cycles, and methods reach their host only through the Host protocol.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` counts, at module level,
inside functions and under ``if TYPE_CHECKING`` alike (a type-only import is still a dependency of the design).
"""

from __future__ import annotations

import pytest
import torch

from support import build_tiny, import_graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


@pytest.mark.parametrize("package", ["spu_engine", "spu_tui"])
def test_no_import_cycles(package):
    graph = import_graph(package)
    assert "spu_engine.methods.base" in graph or package != "spu_engine"  # the walk found the subpackages
    assert [sorted(c) for c in cycles(graph)] == []


def test_methods_import_neither_a_host_nor_the_console():
    hosts = {
        "spu_engine.loop.engine",
        "spu_engine.integrations",
        "spu_engine.runtime.policy_runtime",
        "spu_engine.loop.serve",
    }
    graph = import_graph("spu_engine")
    reached = {m: graph[m] & hosts for m in graph if m.startswith("spu_engine.methods")}
    assert {m: r for m, r in reached.items() if r} == {}
    assert not [m for m in graph if any(t.startswith("spu_tui") for t in graph[m])]


def test_the_runtime_is_the_host_and_the_trainer_the_training_loop(make_engine, tokenizer):
    from spu_engine.core.policy import Policy
    from spu_engine.integrations import attach
    from spu_engine.methods.base import Host, TrainingLoop

    engine = make_engine()
    model = build_tiny("bert", tokenizer)
    controller = attach(Policy(), model, torch.optim.AdamW(model.parameters()))
    assert isinstance(engine.runtime, Host) and isinstance(engine.trainer, TrainingLoop)
    assert isinstance(controller.runtime, Host) and not isinstance(controller.runtime, TrainingLoop)  # it draws no data
    assert all(m.host is engine.runtime for m in engine.methods)
    assert all(m.host is controller.runtime for m in controller.methods)
