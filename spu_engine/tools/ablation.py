"""Adapter ablation (Houlsby et al. 2019, Fig. 6): how much each block's trained adapters matter.

The run's newest checkpoint is loaded into an engine of its own (nothing is
written: no run folder, no events file), then evaluated once as trained and
once for each span of blocks i..j with those blocks' adapters switched off
(the sublayer output passes straight through, as before the adapter was
inserted).  A span of one block is that block alone; the spans make the
paper's heat map, first ablated block by last.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from spu_engine.core.collapse import collapse_note
from spu_engine.model.houlsby import BottleneckAdapter
from spu_engine.model.loading import find_block_list


class AblationError(ValueError):
    """The run cannot be ablated; the text says why."""


def adapters_by_block(model: nn.Module) -> dict[int, list[BottleneckAdapter]]:
    """The Houlsby adapters inside each block, by block index (blocks without adapters left out)."""
    _, blocks = find_block_list(model)
    found = {i: [m for m in block.modules() if isinstance(m, BottleneckAdapter)] for i, block in enumerate(blocks)}
    return {i: adapters for i, adapters in found.items() if adapters}


@contextmanager
def adapters_off(model: nn.Module, blocks: list[int]) -> Iterator[None]:
    """Within the block, the adapters of ``blocks`` pass their input through; they are back on after it."""
    adapters = [a for i, group in adapters_by_block(model).items() if i in blocks for a in group]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters:
            a.enabled = True


@dataclass
class Ablation:
    metric: str  # the task's headline metric
    baseline: float  # with every adapter
    blocks: list[int]
    spans: dict[tuple[int, int], float]  # (first, last) block ablated -> the metric without their adapters
    collapsed: dict[tuple[int, int] | None, str] = field(
        default_factory=dict
    )  # None (every adapter) or a span -> its collapse note, where the answers were one class

    def drop(self, first: int, last: int) -> float:
        return self.baseline - self.spans[(first, last)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "collapsed": self.collapsed.get(None),
            "blocks": self.blocks,
            "spans": [
                {
                    "first": f,
                    "last": last,
                    "value": v,
                    "drop": self.baseline - v,
                    "collapsed": self.collapsed.get((f, last)),
                }
                for (f, last), v in sorted(self.spans.items())
            ],
        }


def ablate(engine, blocks: list[int] | None = None, spans: bool = True, progress=lambda done, total: None) -> Ablation:
    """Evaluate ``engine``'s model without the adapters of each block (and of each span of ``blocks`` if ``spans``)."""
    present = sorted(adapters_by_block(engine.model))
    if not present:
        raise AblationError("this run's model has no Houlsby adapters (peft.method: adapter) to remove")
    blocks = sorted(set(blocks)) if blocks is not None else present
    missing = [b for b in blocks if b not in present]
    if missing:
        raise AblationError(
            f"--blocks: block(s) {', '.join(map(str, missing))} have no adapters; blocks with adapters: {present[0]}-{present[-1]}"
        )
    metric = engine.task.metric
    chosen = set(blocks)
    todo = sorted(
        (first, last)
        for first in blocks
        for last in blocks
        if last == first or (spans and last > first and chosen.issuperset(range(first, last + 1)))
    )
    total = len(todo) + 1
    collapsed: dict[tuple[int, int] | None, str] = {}

    def evaluate(span: tuple[int, int] | None) -> float:
        metrics = engine.evaluate()
        if (note := collapse_note(metrics)) is not None:
            collapsed[span] = note
        return metrics[metric]

    baseline = evaluate(None)
    progress(1, total)
    results: dict[tuple[int, int], float] = {}
    for n, (first, last) in enumerate(todo, start=2):
        with adapters_off(engine.model, list(range(first, last + 1))):
            results[(first, last)] = evaluate((first, last))
        progress(n, total)
    return Ablation(metric, baseline, blocks, results, collapsed)


def engine_for_run(run: Path, **overrides: Any):
    """An engine holding ``run``'s newest checkpoint whose weights verify, writing nothing (a second reader of the run)."""
    from spu_engine.loop.engine import Engine
    from spu_engine.tools.scoring import newest_weights

    config, path, _ = newest_weights(run, [])
    engine = Engine(config.model_copy(update={k: v for k, v in overrides.items() if v is not None}), None, None)
    engine.resume_from(path, fresh_optimizer=True)  # the optimizer plays no part in an evaluation
    return engine
