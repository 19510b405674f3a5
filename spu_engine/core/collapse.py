"""A classifier that gives (nearly) every example one answer: the one test of it, and the one way it is said.

An accuracy or F1 of a collapsed model is the majority class's share, which reads like learning; every place that
shows a classification metric (the training log, ``spu eval``, ``spu ablate``, ``spu report``, the console) says so
with ``collapse_note``.  It reads an evaluation's fields as the engine writes them (``top_answer_share``,
``eval_samples``, ``top_answer``) or flattened as ``RunMetrics`` names them (``eval.top_answer_share``, ...).
"""

from __future__ import annotations

from typing import Any

COLLAPSED_SHARE = 0.99  # of the evaluated examples given the most common answer: a classifier that has collapsed to it
MIN_SAMPLES = 20  # fewer evaluated examples than this say too little to call a collapse


def _field(metrics: dict[str, Any], name: str) -> Any:
    for key in (name, f"eval_{name}", f"eval.{name}", f"eval.{name.removeprefix('eval_')}"):
        if key in metrics:
            return metrics[key]
    return None


def top_answer_share(metrics: dict[str, Any]) -> tuple[float, int] | None:
    """(share of the most common answer, examples evaluated), or None when the evaluation has no such figure."""
    share, n = _field(metrics, "top_answer_share"), _field(metrics, "eval_samples")
    if not isinstance(share, (int, float)) or isinstance(share, bool):
        return None
    return float(share), int(n) if isinstance(n, (int, float)) else 0


def is_collapsed(metrics: dict[str, Any]) -> bool:
    """At least ``COLLAPSED_SHARE`` of at least ``MIN_SAMPLES`` evaluated examples got the same answer."""
    found = top_answer_share(metrics)
    return found is not None and found[1] >= MIN_SAMPLES and found[0] >= COLLAPSED_SHARE


def collapse_note(metrics: dict[str, Any]) -> str | None:
    """One line saying the answers are one class, or None when they are not (or the evaluation cannot tell)."""
    if not is_collapsed(metrics):
        return None
    share, _ = top_answer_share(metrics) or (0.0, 0)
    answer = _field(metrics, "top_answer")
    which = f"class {answer}" if isinstance(answer, (str, int)) and not isinstance(answer, bool) else "one class"
    every = f"every answer is {which}" if share >= 1.0 else f"{share:.1%} of the answers are {which}"
    return f"collapsed: {every}; the metrics reflect the majority class, not learning"
