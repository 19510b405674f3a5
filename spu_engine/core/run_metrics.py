"""Every number a run logged, as named series over steps and wall time.

The console's metric filter, its run comparison and ``spu report`` all read a
run through ``RunMetrics``: each event's numeric fields are flattened to dotted
names, so an event kind or a field added later shows up without code here.

- ``step``: ``train.<field>`` (``train.loss``, ``train.sb_kept_fraction``), ``lr``,
  and nested sections by their own name (``pruning.sparsity``, ``pruning.units.block3``)
- ``eval``: ``eval.<field>`` with the ``eval_`` prefix dropped (``eval.loss``, ``eval.accuracy``)
- ``units``: ``<statistic>.<unit or tensor>`` (``grad_norm.block3``, ``sparsity.<tensor>``)
- any other kind (``system``, ``imp_round``, ``prune``, ...): ``<type>.<field>``
  (``system.cpu_percent``, ``imp_round.kept_by_unit.block0``)

Events that carry no measurement (hello, policy, acks, log lines, ...) add no
series; policy events are kept as change marks.  Torch-free, and tolerant of
any shape: a field that is not a finite number is left out, never an error.
"""

from __future__ import annotations

import fnmatch
import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from spu_engine.methods.registry import section_specs

NOT_MEASURED = frozenset(
    {
        "hello",
        "policy",
        "ack",
        "received",
        "preview",
        "scheduled",
        "state",
        "log",
        "checkpoint",
        "error",
        "resumed",
        "disconnected",
    }
)
NOT_FIELDS = frozenset({"type", "t", "step", "id"})
COUNTERS = frozenset(  # fields that count, size or time what was done rather than measure the run: not metrics
    {
        "samples",
        "tokens",
        "generated",
        "steps",
        "seconds",
        "elapsed",
        "batch_size",
        "micro_batch",
        "cpu_count",
        "world_size",
        "round",
        "rounds",
        "compiles",
        "compile_limit",
        "ram_total",
        "memory_total",
    }
)
GLOB_CHARS = frozenset("*?[")
LOWER_IS_BETTER = ("loss", "perplexity")
NOT_RANKED = ("top_answer_share",)  # a diagnostic, not a score: it has no best value


@dataclass
class Points:
    """One metric's values with the step and wall time (unix seconds) of the event that carried each."""

    steps: array = field(default_factory=lambda: array("q"))
    ts: array = field(default_factory=lambda: array("d"))
    values: array = field(default_factory=lambda: array("d"))

    def add(self, step: int, t: float, value: float) -> None:
        self.steps.append(step)
        self.ts.append(t)
        self.values.append(value)

    def cut_after(self, step: int) -> None:
        """Drop the points past ``step`` (what a killed engine logged after the checkpoint its successor resumed from)."""
        keep = len(self.steps)
        while keep and self.steps[keep - 1] > step:
            keep -= 1
        for column in (self.steps, self.ts, self.values):
            del column[keep:]

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Change:
    step: int
    t: float
    source: str
    text: str


def flatten(ev: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of one event under their dotted names (see the module's docstring)."""
    kind = ev.get("type")
    if not isinstance(kind, str) or kind in NOT_MEASURED:
        return {}
    out: dict[str, float] = {}
    for key, value in ev.items():
        if key in NOT_FIELDS or not isinstance(key, str):
            continue
        if kind == "step":
            name = key if key == "lr" or isinstance(value, dict) else f"train.{key}"
        elif kind == "eval":
            name = f"eval.{key.removeprefix('eval_')}"
        elif kind == "units" and isinstance(value, dict):  # {unit or tensor: {statistic: value}} -> statistic.unit
            for owner, stats in value.items():
                if isinstance(stats, dict):
                    for stat, number in stats.items():
                        _put(out, f"{stat}.{owner}", number)
            continue
        else:
            name = f"{kind}.{key}"
        _walk(out, name, value)
    return out


def _walk(out: dict[str, float], name: str, value: Any, depth: int = 0) -> None:
    if isinstance(value, dict) and depth < 4:
        for key, inner in value.items():
            _walk(out, f"{name}.{key}", inner, depth + 1)
    else:
        _put(out, name, value)


def _put(out: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[name] = float(value)


def matching(names: list[str], pattern: str) -> list[str]:
    """``names`` that match the glob ``pattern`` (fnmatch); a pattern without ``* ? [`` matches anywhere in the name."""
    pattern = pattern.strip()
    if not pattern:
        return list(names)
    if not GLOB_CHARS & set(pattern):
        pattern = f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


class RunMetrics:
    """One run as its events tell it: every metric series, the policy changes, and what the run is."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.series: dict[str, Points] = {}
        self.changes: list[Change] = []
        self.metric = "accuracy"  # the task's headline metric, as the engine's hello names it
        self.start_t: float | None = None
        self.step = 0
        self.state = ""
        self.config: dict[str, Any] = {}
        self.task = ""
        self.total_params: int | None = None
        self.policy: dict[str, Any] = {}  # the sections in force after the last change
        self.units: list[str] = []  # the model's units in order (embeddings, block0, ..., head)
        self.last_eval: dict[str, Any] = {}  # the newest eval event as it came, texts included (``top_answer``)

    def add(self, ev: Any) -> bool:
        """Take one event into account; True when a series or a change mark moved."""
        if not isinstance(ev, dict):
            return False
        t = ev.get("t")
        t = float(t) if isinstance(t, (int, float)) and math.isfinite(t) else (self.start_t or 0.0)
        if self.start_t is None and t:
            self.start_t = t
        step = ev.get("step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else self.step
        kind = ev.get("type")
        if kind == "hello":
            self._hello(ev)
            return False
        if kind == "state" and isinstance(ev.get("state"), str):
            self.state = ev["state"]
            return False
        if kind == "resumed":
            for points in self.series.values():
                points.cut_after(step)
            self.changes = [c for c in self.changes if c.step <= step]
            if self.last_eval.get("step", 0) > step:
                self.last_eval = {}
            self.step = step
            return True
        if kind == "policy":
            self.changes.append(Change(step, t, str(ev.get("source", "?")), describe_change(ev.get("change") or {})))
            if isinstance(ev.get("policy"), dict):
                self.policy = ev["policy"]
            self._take_units(ev.get("units"))
            return True
        if kind == "step" and step <= self.step and self.series:
            return False  # a step seen before (the live stream overlapping the history)
        if kind == "eval":
            self.last_eval = ev
        numbers = flatten(ev)
        for name, value in numbers.items():
            self.series.setdefault(name, Points()).add(step, t, value)
        if kind == "step":
            self.step = max(self.step, step)
        return bool(numbers)

    def _hello(self, ev: dict[str, Any]) -> None:
        if isinstance(ev.get("metric"), str):
            self.metric = ev["metric"]
        if isinstance(ev.get("config"), dict):
            self.config = ev["config"]
        if isinstance(ev.get("task"), str):
            self.task = ev["task"]
        if isinstance(ev.get("total_params"), int):
            self.total_params = ev["total_params"]
        if isinstance(ev.get("current"), dict) and not self.changes:
            self.policy = ev["current"]
        self._take_units(ev.get("units"))

    def _take_units(self, units: Any) -> None:
        if isinstance(units, list) and units:
            self.units = [u["name"] for u in units if isinstance(u, dict) and isinstance(u.get("name"), str)]

    @property
    def names(self) -> list[str]:
        return sorted(self.series)

    @property
    def metric_names(self) -> list[str]:
        """The names of what the run measured (``eval.accuracy``, ``system.cpu_process``), leaving out the
        ``COUNTERS`` (``eval.samples``, ``train.batch_size``): what the metric filter offers."""
        return [name for name in self.names if name.rsplit(".", 1)[-1] not in COUNTERS]

    def last(self, name: str) -> float | None:
        points = self.series.get(name)
        return points.values[-1] if points else None

    def best(self, name: str) -> tuple[float, int] | None:
        """The best value of ``name`` and its step: the lowest for losses and perplexity, else the highest; None for
        a figure that is no score (``top_answer_share``: high is a collapse, low is no better)."""
        points = self.series.get(name)
        if not points or name.endswith(NOT_RANKED):
            return None
        pick = min if any(word in name for word in LOWER_IS_BETTER) else max
        i = pick(range(len(points)), key=points.values.__getitem__)
        return points.values[i], points.steps[i]

    def x_of(self, points: Points, by_time: bool) -> list[float]:
        """The x values of ``points``: steps, or minutes since the run's first event."""
        if not by_time:
            return [float(s) for s in points.steps]
        start = self.start_t or (points.ts[0] if points.ts else 0.0)
        return [(t - start) / 60 for t in points.ts]

    def change_xs(self, by_time: bool) -> list[float]:
        if not by_time:
            return [float(c.step) for c in self.changes]
        start = self.start_t or 0.0
        return [(c.t - start) / 60 for c in self.changes]


def smoothed(values: list[float], factor: float = 0.9) -> list[float]:
    """An exponential moving average (the console's smoothed loss curve)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else factor * out[-1] + (1 - factor) * v)
    return out


def describe_change(change: dict[str, Any]) -> str:
    """A policy change in a few words: ``freeze embeddings, block0; pruning: method=magnitude``."""
    parts = []
    for rule in change.get("freeze", []) or []:
        if not isinstance(rule, dict):
            continue
        what = rule.get("match") or ", ".join(rule.get("units") or []) or f"layers {rule.get('layers')}"
        parts.append(f"{'unfreeze' if rule.get('trainable') else 'freeze'} {what}")
    specs = section_specs()
    for section, values in (change.get("set") or {}).items():
        if isinstance(values, dict) and section in specs:
            values = specs[section].settings.applicable(values)
        if isinstance(values, dict):  # an unset field (None: the run's own value) is not a change to name
            shown = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
        else:
            shown = str(values)
        parts.append(f"{section}: {shown}")
    return "; ".join(parts) or "no-op"


def describe_methods(policy: dict[str, Any]) -> str:
    """What a policy switches on, in a few words (the run browser's column): ``LoRA r8 · magnitude 90% · 2 freeze rules``."""
    parts = []
    peft = policy.get("peft") or {}
    method = peft.get("method", "none") if isinstance(peft, dict) else "none"
    if method == "lora":
        parts.append(f"LoRA r{peft.get('r', '?')}")
    elif method == "adapter":
        parts.append(f"adapters {peft.get('size', '?')}")
    elif method not in ("none", None):
        parts.append({"ia3": "(IA)³", "bitfit": "BitFit"}.get(method, str(method)))
    pruning = policy.get("pruning") or {}
    if isinstance(pruning, dict) and pruning.get("method", "none") != "none":
        final = (pruning.get("schedule") or {}).get("final_sparsity")
        parts.append(
            f"{pruning['method']}"
            + (f" {final:.0%}" if isinstance(final, (int, float)) and pruning["method"] != "imp" else "")
        )
    sb = policy.get("selective_backprop") or {}
    if isinstance(sb, dict) and sb.get("mode", "off") != "off":
        parts.append(f"SB {sb['mode']}" + (f" {sb.get('keep')}" if sb["mode"] == "percentile" else ""))
    if (policy.get("weight_update_skipping") or {}).get("enabled"):
        parts.append("WUS")
    if (policy.get("distillation") or {}).get("enabled"):
        parts.append("distillation")
    rules = [r for r in policy.get("freeze") or [] if isinstance(r, dict)]
    if rules:
        parts.append(f"{len(rules)} freeze rule{'s' if len(rules) > 1 else ''}")
    return " · ".join(parts) or "full fine-tuning"
