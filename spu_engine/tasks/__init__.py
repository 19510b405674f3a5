"""Tasks: what a batch is, how a per-sample loss is computed, how a model is evaluated.

Each task is one module behind the small :class:`Task` interface, registered in ``TASKS``.
The engine only ever calls ``per_sample_loss`` (so selective backprop works for every
task), ``collate`` and ``evaluate``.
"""

from __future__ import annotations

from spu_engine.tasks.base import Task, TaskOptions
from spu_engine.tasks.classification import ClassificationTask
from spu_engine.tasks.infer import TaskUnclear, infer_task
from spu_engine.tasks.lm import LMTask
from spu_engine.tasks.qa import QATask
from spu_engine.tasks.sft import SftTask

TASKS: dict[str, type[Task]] = {
    ClassificationTask.name: ClassificationTask,
    QATask.name: QATask,
    LMTask.name: LMTask,
    SftTask.name: SftTask,
}


def get_task(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "TaskOptions", "TaskUnclear", "get_task", "infer_task"]
