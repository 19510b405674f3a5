"""The ``hello`` event: everything a client needs to draw a run from scratch (the console on attach, events.jsonl
for the history of a dead run)."""

from __future__ import annotations

import os
from typing import Any

from spu_engine.core.model_source import resolve_model_name
from spu_engine.core.protocol import event
from spu_engine.model.loading import count_params
from spu_engine.runtime.unit_stats import describe_units


def hello_event(engine) -> dict[str, Any]:
    """The snapshot of ``engine`` (a ``loop.engine.Engine``) now."""
    return event(
        "hello",
        run=engine.run_dir.name if engine.run_dir else None,
        run_dir=str(engine.run_dir) if engine.run_dir else None,
        pid=os.getpid(),
        config=engine.config.model_dump(),
        model_path=resolve_model_name(engine.config.model),
        task=engine.task.name,
        metric=engine.task.metric,
        units=describe_units(engine.units, engine.params),
        policy=engine.replayable_policy().model_dump(mode="json", exclude_none=True),
        current=engine.current.model_dump(mode="json", exclude_none=True),
        scheduled=engine.scheduled(),
        state=engine.state.value,
        step=engine.step,
        total_steps=engine.config.steps,
        trainable=engine.trainable_count(),
        total_params=count_params(engine.model),
        device=str(engine.device),
    )
