"""Automatic freezing: LISA (Pan et al. 2024) and AutoFreeze (Liu et al. 2021) decide which blocks train.

``lisa``: every ``interval`` steps, from the step it is switched on, ``n_layers`` blocks drawn at
random train and the other blocks are frozen; the embeddings and the head train or not as set.
The draw at step s is a function of the run's seed and s alone, so a resumed run continues the
same sequence.  ``autofreeze``: every ``stats_every`` steps (the steps the engine gathers its
statistics on; computing the norms every step would cost some 10 % of a MiniLM step on a CPU)
adds each training block's gradient norm (after clipping, as the ``units`` statistics show it)
to the interval's mean; at the end of each
``interval`` the front blocks whose mean changed by less than the bound since the interval before
are frozen (``freeze_advice.settled_blocks``), with the embeddings once block 0 is.

A decision is an ordinary freeze change: rules marked ``by: auto_freeze``, applied through the
host and recorded in the timeline at its step like any change, so the exported policy replays the
exact freezes.  The export also sets ``decided_through`` (the last step this method decided at),
and up to that step the method only keeps its clock: the recorded entries decide.

A freeze rule without the mark that follows one with it (from the console, a trigger or the
timeline) takes the units it selects out of automatic freezing for the rest of the run: the user's
rule stays the last match for them, and the method says so in the log.  With PEFT, freezing a
block freezes the tensors of it that train (LoRA's, an adapter's): the rules select by block, and
the method's gate still decides which of a block's tensors can train at all.
"""

from __future__ import annotations

import math
import random
from typing import Any

from spu_engine.core.freeze_advice import block_span, relative_change, settled_blocks
from spu_engine.core.policy import Change, FreezeRule, Policy, PolicyError
from spu_engine.methods.auto_freeze.settings import AutoFreeze as Settings
from spu_engine.methods.base import Host, Method
from spu_engine.runtime.selection import rule_selects
from spu_engine.runtime.unit_stats import grad_norms_by_unit

SOURCE = "auto_freeze"


class AutoFreeze(Method):
    section = "auto_freeze"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.settings = Settings()
        self.rules: list[FreezeRule] = []  # the freeze rules in force (for the units a user's rule took over)
        self.pinned: set[str] = set()
        self.started: int | None = None  # the step the method in force was switched on
        self.last_decided: int | None = None  # the last step it decided at (or, replaying, would have)
        self.sums: dict[str, list[float]] = {}  # autofreeze: block -> [sum of gradient norms, steps] of this interval
        self.previous: dict[str, float] = {}  # autofreeze: block -> mean gradient norm of the interval before

    @property
    def active(self) -> bool:
        return self.settings.method != "none"

    def configure(self, policy: Policy, step: int) -> None:
        new = policy.auto_freeze
        blocks = self.host.units.num_blocks
        if new.method != "none" and blocks == 0:
            raise PolicyError(
                f"auto_freeze.method: {new.method} chooses blocks, and this model has none that SPU recognises"
            )
        every = self.host.config.stats_every
        if new.method == "autofreeze" and new.interval < every:
            raise PolicyError(
                f"auto_freeze.interval: {new.interval} is shorter than stats_every ({every}): autofreeze averages the gradient "
                f"norms sampled every stats_every steps over an interval (allowed: {every} or more; a few times it is better)"
            )
        if new.method == "lisa" and new.n_layers > blocks:
            raise PolicyError(
                f"auto_freeze.n_layers: {new.n_layers} is more than the model's {blocks} blocks (allowed: 1-{blocks})"
            )
        if new.method != self.settings.method:
            self.started = step if new.method != "none" else None
            self.sums, self.previous = {}, {}
        self.settings, self.rules = new, policy.freeze
        pinned = self._pinned(policy.freeze)
        if self.active and pinned - self.pinned:
            taken = sorted(pinned - self.pinned)
            self.host.log(
                f"auto_freeze: {', '.join(taken)} {'follows' if len(taken) == 1 else 'follow'} your freeze rules from now on "
                f"({new.method} leaves {'it' if len(taken) == 1 else 'them'} as you set {'it' if len(taken) == 1 else 'them'})"
            )
        self.pinned = pinned

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        auto = after.auto_freeze
        if auto.method == "lisa":
            embeddings, head = "train" if auto.embeddings else "frozen", "trains" if auto.head else "frozen"
            return [
                (
                    f"lisa: from the next step, every {auto.interval} steps {auto.n_layers} of the blocks train, "
                    f"drawn at random; embeddings {embeddings}, head {head} "
                    "(the count above is before the first draw)"
                )
            ]
        if auto.method == "autofreeze":
            bound = f"{auto.threshold:.0%}" if auto.threshold is not None else f"the {auto.percentile:g}th percentile"
            return [
                (
                    f"autofreeze: every {auto.interval} steps, front blocks whose gradient-norm change is "
                    f"below {bound} freeze"
                )
            ]
        return []

    def exported(self, initial: Policy) -> Policy:
        """Marked as decided up to its last decision (the decisions are recorded as freeze entries)."""
        if self.last_decided is None:
            return initial
        auto = initial.auto_freeze
        through = max(self.last_decided, auto.decided_through or 0)
        return initial.model_copy(update={"auto_freeze": auto.model_copy(update={"decided_through": through})})

    def _pinned(self, rules: list[FreezeRule]) -> set[str]:
        """The units a rule without ``by: auto_freeze`` selects, among the rules after the first one with it."""
        first = next((i for i, r in enumerate(rules) if r.by == SOURCE), None)
        if first is None:
            return set()
        units, names = self.host.units, self.host.param_names
        return {
            units.unit_for(n) for r in rules[first + 1 :] if r.by is None for n in names if rule_selects(r, n, units)
        }

    # ------------------------------------------------------------------ decisions

    def before_step(self, step: int) -> None:
        if not self.active or self.started is None:
            return
        s = self.settings
        due = step >= self.started and (step - self.started) % s.interval == 0
        if s.method == "autofreeze" and step == self.started:
            due = False  # nothing measured yet
        if due:
            scripted = s.decided_through is not None and step <= s.decided_through
            if s.method == "lisa":
                if not scripted:
                    self._resample(step)
            else:
                self._close_interval(step, apply=not scripted)
            self.last_decided = step
        if s.optimizer_state == "drop":
            self._drop_frozen_state()

    def _blocks(self) -> list[str]:
        return [f"block{i}" for i in range(self.host.units.num_blocks)]

    def _resample(self, step: int) -> None:
        s = self.settings
        free = [i for i, b in enumerate(self._blocks()) if b not in self.pinned]
        chosen = sorted(random.Random(f"lisa:{self.host.config.seed}:{step}").sample(free, min(s.n_layers, len(free))))
        rules = []
        if free:
            rules.append(FreezeRule(layers=free, trainable=False, by=SOURCE))
        if chosen:
            rules.append(FreezeRule(layers=chosen, trainable=True, by=SOURCE))
        present = set(self.host.units.names)
        for unit, trains in (("embeddings", s.embeddings), ("head", s.head)):
            if unit in present and unit not in self.pinned:
                rules.append(FreezeRule(units=[unit], trainable=trains, by=SOURCE))
        if rules:
            self.host.apply_change(Change(freeze=rules), source=SOURCE)
            self.host.log(
                f"lisa: {block_span([f'block{i}' for i in chosen]) if chosen else 'no block'} train until step {step + s.interval}"
            )

    def _close_interval(self, step: int, apply: bool) -> None:
        """The interval's mean gradient norms against the interval before's; freeze the settled front blocks."""
        means = {b: total / n for b, (total, n) in self.sums.items() if n}
        changes = {b: relative_change(self.previous[b], m) for b, m in means.items() if b in self.previous}
        self.previous, self.sums = means, {}
        if not apply:
            return
        s = self.settings
        blocks = self._blocks()
        trains = {b for b in blocks if self._trains(b)}
        chosen, bound = settled_blocks(
            changes, blocks, trains, set(blocks) - self.pinned, s.threshold, s.percentile, s.allow_gaps
        )
        if not chosen:
            return
        rules = [FreezeRule(layers=[int(b[5:]) for b in chosen], trainable=False, by=SOURCE)]
        prefix_frozen = "block0" in chosen or "block0" not in trains
        if (
            prefix_frozen
            and "embeddings" in self.host.units.names
            and "embeddings" not in self.pinned
            and self._trains("embeddings")
        ):
            rules.append(FreezeRule(units=["embeddings"], trainable=False, by=SOURCE))
        worst = max(changes[b] or 0.0 for b in chosen)
        self.host.apply_change(Change(freeze=rules), source=SOURCE)
        self.host.log(
            f"autofreeze: {block_span(chosen)} frozen at step {step}: gradient-norm change at most {worst:.1%}, "
            f"below {bound:.1%}" + (" and the embeddings with block 0" if len(rules) > 1 else "")
        )

    def _trains(self, unit: str) -> bool:
        params = self.host.params
        return any(params[n].requires_grad for n in self.host.units[unit].params)

    def _managed(self) -> list[str]:
        units = self._blocks() + ["embeddings"] + (["head"] if self.settings.method == "lisa" else [])
        present = set(self.host.units.names)
        return [u for u in units if u in present and u not in self.pinned]

    def keeps_frozen_state(self, policy: Policy) -> set[str]:
        """``optimizer_state: keep``: the units this method manages keep their AdamW state while frozen."""
        s = policy.auto_freeze
        if s.method == "none" or s.optimizer_state != "keep":
            return set()
        return {n for u in self._managed() for n in self.host.units[u].params}

    def _drop_frozen_state(self) -> None:
        """``optimizer_state: drop``: a tensor of a unit automatic freezing manages that is frozen holds no AdamW state."""
        params = self.host.params
        frozen = [params[n] for u in self._managed() for n in self.host.units[u].params if not params[n].requires_grad]
        stale = [p for p in frozen if self.host.optimizer_state(p)]
        if stale:
            self.host.forget_optimizer_state(stale)

    def on_gradients(self, step: int) -> None:
        if self.settings.method != "autofreeze" or (step + 1) % self.host.config.stats_every:
            return
        for unit, norm in grad_norms_by_unit(self.host.units, self.host.params).items():
            if unit.startswith("block") and math.isfinite(
                norm
            ):  # fp16's scaler skips a step with inf gradients: not a sample
                total = self.sums.setdefault(unit, [0.0, 0])
                total[0] += norm
                total[1] += 1

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "last_decided": self.last_decided,
            "sums": self.sums,
            "previous": self.previous,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.started, self.last_decided = state.get("started"), state.get("last_decided")
            self.sums = {b: [float(t), int(n)] for b, (t, n) in state.get("sums", {}).items()}
            self.previous = {b: float(v) for b, v in state.get("previous", {}).items()}
