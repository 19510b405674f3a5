"""What the console knows about a run, rebuilt from engine events alone.

The same ``RunState.apply`` consumes live events from the socket and the
history in ``events.jsonl``, so attaching to a run late draws exactly what a
console attached from the start would show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMOOTHING = 0.9  # EMA factor of the smoothed train-loss curve


@dataclass
class LogLine:
    step: int
    kind: str  # policy | eval | state | checkpoint | export | error | log | ui
    text: str
    error: bool = False


@dataclass
class RunState:
    run: str = "?"
    run_dir: str = ""
    model: str = "?"
    state: str = "connecting"
    step: int = 0
    total_steps: int = 0
    samples_per_s: float = 0.0
    step_time: float | None = None
    metric: str = "accuracy"
    units: list[dict[str, Any]] = field(default_factory=list)
    unit_trainable: dict[str, float] = field(default_factory=dict)
    tensor_trainable: dict[str, bool] = field(default_factory=dict)
    unit_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    tensor_sparsity: dict[str, float] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    loss_steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    loss_smooth: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_metric: list[float] = field(default_factory=list)
    change_steps: list[int] = field(default_factory=list)
    log: list[LogLine] = field(default_factory=list)
    last_t: float = 0.0

    @property
    def eta_s(self) -> float | None:
        if self.step_time is None or self.state != "training":
            return None
        return max(0, self.total_steps - self.step) * self.step_time

    def apply(self, ev: dict[str, Any]) -> set[str]:
        """Take one event into account; returns the views it touched (header, tree, plots, log, controls)."""
        kind = ev.get("type")
        handler = getattr(self, f"_on_{kind}", None)
        self.last_t = max(self.last_t, ev.get("t", 0.0))
        return handler(ev) if handler else set()

    def _say(self, step: int, kind: str, text: str, error: bool = False) -> None:
        self.log.append(LogLine(step, kind, text, error))

    def _on_hello(self, ev: dict[str, Any]) -> set[str]:
        self.run = ev.get("run") or self.run
        self.run_dir = ev.get("run_dir") or self.run_dir
        config = ev.get("config") or {}
        self.model = _short_model(config.get("model", self.model))
        self.state = ev.get("state", self.state)
        self.step = ev.get("step", self.step)
        self.total_steps = ev.get("total_steps") or config.get("steps", self.total_steps)
        self.metric = ev.get("metric") or self.metric
        if ev.get("units"):
            self.units = ev["units"]
            for u in self.units:
                for p in u["params"]:
                    if "trainable" in p:
                        self.tensor_trainable[p["name"]] = p["trainable"]
                self.unit_trainable.setdefault(u["name"], 1.0)
            self._unit_fractions_from_tensors()
        if ev.get("current") is not None:
            self.policy = ev["current"]
        return {"header", "tree", "controls", "plots"}

    def _on_state(self, ev: dict[str, Any]) -> set[str]:
        self.state = ev["state"]
        self.step = ev.get("step", self.step)
        message = ev.get("message") or ""
        self._say(self.step, "state", f"{self.state}{': ' + message if message else ''}", error=self.state == "error")
        return {"header", "log"}

    def _on_step(self, ev: dict[str, Any]) -> set[str]:
        if self.loss_steps and ev["step"] <= self.loss_steps[-1]:
            return set()
        self.step = ev["step"]
        self.samples_per_s = ev.get("samples_per_s", self.samples_per_s)
        dt = ev.get("step_time")
        if dt is not None:
            self.step_time = dt if self.step_time is None else SMOOTHING * self.step_time + (1 - SMOOTHING) * dt
        loss = ev.get("loss")
        if isinstance(loss, (int, float)) and loss == loss and abs(loss) != float("inf"):
            self.loss_steps.append(self.step)
            self.loss.append(loss)
            prev = self.loss_smooth[-1] if self.loss_smooth else loss
            self.loss_smooth.append(SMOOTHING * prev + (1 - SMOOTHING) * loss)
        if self.state in ("loading", "connecting"):
            self.state = "training"
        return {"header", "plots"}

    def _on_units(self, ev: dict[str, Any]) -> set[str]:
        self.unit_stats = ev.get("units", {})
        for name, s in self.unit_stats.items():
            self.unit_trainable[name] = s.get("trainable", self.unit_trainable.get(name, 1.0))
        for name, s in (ev.get("tensors") or {}).items():
            self.tensor_trainable[name] = s.get("trainable", True)
            self.tensor_sparsity[name] = s.get("sparsity", 0.0)
        return {"tree", "plots"}

    def _on_eval(self, ev: dict[str, Any]) -> set[str]:
        self.eval_steps.append(ev["step"])
        self.eval_loss.append(ev.get("eval_loss", float("nan")))
        self.eval_metric.append(ev.get(self.metric, float("nan")))
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if k not in ("type", "t", "step") and isinstance(v, float))
        self._say(ev["step"], "eval", metrics)
        return {"plots", "log"}

    def _on_policy(self, ev: dict[str, Any]) -> set[str]:
        self.policy = ev.get("policy", self.policy)
        self.unit_trainable.update(ev.get("trainable_by_unit") or {})
        frozen = ev.get("frozen_tensors")
        if frozen is not None:
            frozen_set = set(frozen)
            for u in self.units:
                for p in u["params"]:
                    self.tensor_trainable[p["name"]] = p["name"] not in frozen_set
        self.change_steps.append(ev["step"])
        self._say(ev["step"], "policy", f"{describe_change(ev.get('change') or {})} ({ev.get('source', '?')}); trainable {ev.get('trainable', 0):,}")
        return {"tree", "plots", "log", "controls"}

    def _on_ack(self, ev: dict[str, Any]) -> set[str]:
        if ev.get("ok") and ev.get("cmd") in ("export", "checkpoint") and ev.get("message"):
            self._say(ev.get("step", self.step), ev["cmd"], ev["message"])
            return {"log"}
        return set()

    def _on_error(self, ev: dict[str, Any]) -> set[str]:
        self._say(ev.get("step", self.step), "error", ev.get("message", "?"), error=True)
        return {"log"}

    def _on_checkpoint(self, ev: dict[str, Any]) -> set[str]:
        self._say(ev["step"], "checkpoint", ev.get("path", ""))
        return {"log"}

    def _on_log(self, ev: dict[str, Any]) -> set[str]:
        level = ev.get("level", "info")
        self._say(ev.get("step", self.step), "log", ev.get("message", ""), error=level in ("error", "warning"))
        return {"log"}

    def _on_disconnected(self, ev: dict[str, Any]) -> set[str]:
        if self.state not in ("finished", "stopped", "error"):
            self.state = "detached"
            self._say(self.step, "state", "engine connection lost: " + ev.get("message", ""), error=True)
        return {"header", "log"}

    def _unit_fractions_from_tensors(self) -> None:
        for u in self.units:
            known = [p for p in u["params"] if p["name"] in self.tensor_trainable]
            if known and u["numel"]:
                self.unit_trainable[u["name"]] = sum(p["numel"] for p in known if self.tensor_trainable[p["name"]]) / u["numel"]

    def unit_of(self, tensor: str) -> str | None:
        for u in self.units:
            if any(p["name"] == tensor for p in u["params"]):
                return u["name"]
        return None


def describe_change(change: dict[str, Any]) -> str:
    parts = []
    for rule in change.get("freeze", []):
        what = rule.get("match") or ", ".join(rule.get("units") or []) or f"layers {rule.get('layers')}"
        parts.append(f"{'unfreeze' if rule.get('trainable') else 'freeze'} {what}")
    for section, values in (change.get("set") or {}).items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items()) if isinstance(values, dict) else str(values)
        parts.append(f"{section}: {shown}")
    return "; ".join(parts) or "no-op"


def _short_model(model: str) -> str:
    path = Path(model.rstrip("/"))
    return path.parent.name if path.name == "model" and path.parent.name else path.name or model
