"""Iterative magnitude pruning, lottery-ticket style (Frankle & Carbin 2019; Chen et al. 2020 for BERT).

Train ``round_steps``, remove ``fraction`` of the remaining target weights by
magnitude, then put every survivor (and every other parameter) back to the
reference weights and train again with fresh optimizer state; ``rounds`` times.
The reference is either the weights when IMP started (``reset: pretrained``;
at step 0 these are the pretrained weights) or the weights at an early step
(``reset: rewind`` to ``rewind_step``, Frankle et al. 2020).  Each pruning is an
event (``prune``) and a log line, so it shows on the console's timeline.

Each mask is trained ``round_steps`` (unset: the steps from IMP's start to the run's end, shared by its masks;
round 0: the mask IMP started from; round
k: after k prunings), and at the end of each the host evaluates (``eval_due``)
and an ``imp_round`` event reports the round: its sparsity, the kept share of
every target tensor and unit, mean training loss, the evaluation and the time
it took; ``spu report`` prints them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from spu_engine.core.policy import PolicyError
from spu_engine.methods.pruning.base import Pruner
from spu_engine.model.sharded import is_distributed, laid_out_like


@dataclass
class RoundTally:
    """What the round being trained has done so far; checkpointed, so a resumed round reports all of it."""

    start_step: int
    steps: int = 0
    loss_sum: float = 0.0
    train_seconds: float = 0.0  # the steps' own time
    elapsed: float = 0.0  # wall seconds of this round before ``started`` (an earlier process's, on resume)
    started: float | None = None  # perf_counter when this process started timing it

    def seconds(self) -> float:
        return self.elapsed + (time.perf_counter() - self.started if self.started is not None else 0.0)


class IMPPruner(Pruner):
    name = "imp"

    def __init__(self, host, masks, targets, settings, step: int) -> None:
        super().__init__(host, masks, targets, settings, step)
        self.rounds_done = 0
        self.start_sparsity = self.sparsity() if masks.masks else 0.0
        self.round_steps = self.steps_per_round(settings, step, host.config.steps)
        self.next_round = max(settings.schedule.start_step, step) + self.round_steps
        self.tally: RoundTally | None = RoundTally(
            max(settings.schedule.start_step, step)
        )  # None: every round reported
        self.reference: dict[str, torch.Tensor] = {}
        self.reference_step: int | None = None
        if settings.imp.reset == "pretrained" or settings.imp.rewind_step is None:
            self._snapshot(step)

    @staticmethod
    def steps_per_round(settings, step: int, run_steps: int | None) -> int:
        """``imp.round_steps``, or unset: the steps left from IMP's start, shared by the rounds + 1 masks it trains (the
        last one too), so the last round ends by the run's end; PolicyError for a loop that does not say its length."""
        if settings.imp.round_steps is not None:
            return settings.imp.round_steps
        if run_steps is None:
            raise PolicyError(
                "pruning.imp.round_steps: this loop does not say its length (attach(..., steps=N)); set round_steps"
            )
        left = run_steps - max(settings.schedule.start_step, step)
        return max(1, left // (settings.imp.rounds + 1))

    @staticmethod
    def validate(settings, step: int, has_reference_at: int | None, run_steps: int | None) -> None:
        imp = settings.imp
        round_steps = IMPPruner.steps_per_round(settings, step, run_steps)
        if imp.reset != "rewind" or imp.rewind_step is None or has_reference_at == imp.rewind_step:
            return
        if imp.rewind_step < step:
            raise PolicyError(
                f"pruning.imp.rewind_step: step {imp.rewind_step} has passed (the run is at step {step}); "
                f"choose a rewind_step >= {step}, or reset: pretrained"
            )
        first_round = max(settings.schedule.start_step, step) + round_steps
        if imp.rewind_step >= first_round:
            raise PolicyError(
                f"pruning.imp.rewind_step: {imp.rewind_step} is not before the first round at step {first_round} "
                f"(start_step + round_steps); rewinding needs weights saved before pruning starts"
            )

    def reconfigure(self, settings, step: int) -> None:
        old = self.settings.imp
        super().reconfigure(settings, step)
        if settings.imp.round_steps != old.round_steps:
            new = self.steps_per_round(settings, step, self.host.config.steps)
            self.next_round = max(self.next_round - self.round_steps + new, step)
            self.round_steps = new
        if settings.imp.reset != old.reset or settings.imp.rewind_step != old.rewind_step:
            self.reference, self.reference_step = {}, None
            if settings.imp.reset == "pretrained" or settings.imp.rewind_step is None:
                self._snapshot(step)

    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        dense = {n: self.masks.dense(n) if n in self.masks.masks else p.detach() for n, p in self.host.params.items()}
        # aside on the CPU; a shard stays where it is (each rank keeps its part of the reference)
        self.reference = {n: t.clone() if is_distributed(t) else t.to("cpu", copy=True) for n, t in dense.items()}
        self.reference_step = step

    def final_sparsity(self) -> float:
        imp = self.settings.imp
        return 1.0 - (1.0 - self.start_sparsity) * (1.0 - imp.fraction) ** imp.rounds

    def target(self, step: int) -> float | None:
        return self.final_sparsity()

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        return self.kept_first({n: self.masks.dense(n).abs().float() for n in self.targets})

    def before_step(self, step: int) -> None:
        imp = self.settings.imp
        if imp.reset == "rewind" and self.reference_step is None and step == imp.rewind_step:
            self._snapshot(step)
        if self.tally is not None and step >= self.next_round:
            self._report(step, {})  # the round ended without an evaluation (a loop of your own, or it failed)
        if self.rounds_done < imp.rounds and step >= self.next_round:
            self._prune(step)
            self.tally = RoundTally(step)
        if self.tally is not None and self.tally.started is None and step >= self.tally.start_step:
            self.tally.started = time.perf_counter()

    def _prune(self, step: int) -> None:
        imp = self.settings.imp
        self.rounds_done += 1
        self.next_round = step + self.round_steps
        sparsity = 1.0 - (1.0 - self.sparsity()) * (1.0 - imp.fraction)
        self.apply(sparsity)
        self._reset()
        what = "pretrained weights" if imp.reset == "pretrained" else f"weights of step {self.reference_step}"
        self.host.emit(
            "prune",
            step=step,
            method=self.name,
            round=self.rounds_done,
            rounds=imp.rounds,
            sparsity=round(self.sparsity(), 5),
            reset=imp.reset,
        )
        self.host.log(
            f"IMP round {self.rounds_done}/{imp.rounds}: removed {imp.fraction:.0%} of the remaining weights "
            f"(sparsity {self.sparsity():.1%}); survivors reset to the {what}"
        )

    @torch.no_grad()
    def _reset(self) -> None:
        """Survivors (and all other parameters) back to the reference; optimizer state starts afresh."""
        reset = []
        for n, p in self.host.params.items():
            if n in self.reference:
                p.copy_(laid_out_like(self.reference[n].to(p.device), p))
                reset.append(p)
                if n in self.masks.masks:
                    self.masks.rebase(n)
        self.host.forget_optimizer_state(reset)

    # -- the round report ---------------------------------------------------------

    def after_step(self, step: int, loss: float, seconds: float, began: float) -> None:
        t = self.tally
        if t is not None and t.start_step < step <= self.next_round:
            t.steps += 1
            t.loss_sum += loss
            t.train_seconds += seconds
            if t.started is not None:  # the step began before before_step started the clock: the round holds it whole
                t.started = min(t.started, began)

    def eval_due(self, step: int) -> bool:
        return self.tally is not None and step == self.next_round

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.eval_due(step):
            self._report(step, metrics)

    def _report(self, step: int, metrics: dict[str, float]) -> None:
        """The ``imp_round`` event of the round that ends at ``step``."""
        t, pruned = self.tally, {n: self.masks.pruned(n) for n in self.targets}
        size = {n: self.masks.param(n).numel() for n in self.targets}
        by_unit: dict[str, list[int]] = {}
        for n in self.targets:
            cell = by_unit.setdefault(self.host.units.unit_for(n), [0, 0])
            cell[0] += size[n] - pruned[n]
            cell[1] += size[n]
        self.host.emit(
            "imp_round",
            step=step,
            round=self.rounds_done,
            rounds=self.settings.imp.rounds,
            start_step=t.start_step,
            steps=t.steps,
            sparsity=round(self.sparsity(), 5),
            train_loss=round(t.loss_sum / t.steps, 6) if t.steps else None,
            eval={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            seconds=round(t.seconds(), 3),
            train_seconds=round(t.train_seconds, 3),
            kept_by_tensor={n: round(1 - pruned[n] / size[n], 5) for n in self.targets},
            kept_by_unit={u: round(kept / total, 5) for u, (kept, total) in by_unit.items()},
        )
        self.tally = None

    def stats(self) -> dict[str, Any]:
        return {"pruning_round": self.rounds_done}

    def state_dict(self) -> dict[str, Any]:
        tally = None
        if self.tally is not None:
            tally = {**asdict(self.tally), "elapsed": self.tally.seconds(), "started": None}
        return {
            "rounds_done": self.rounds_done,
            "next_round": self.next_round,
            "round_steps": self.round_steps,
            "start_sparsity": self.start_sparsity,
            "reference_step": self.reference_step,
            "tally": tally,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_done = state.get("rounds_done", 0)
        self.next_round = state.get("next_round", self.next_round)
        self.round_steps = state.get("round_steps", self.round_steps)
        self.start_sparsity = state.get("start_sparsity", self.start_sparsity)
        self.reference_step = state.get("reference_step")
        if "tally" in state:  # checkpoints from before the round report keep the fresh tally
            self.tally = RoundTally(**state["tally"]) if state["tally"] else None

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return {f"reference.{n}": t for n, t in self.reference.items()}

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = "reference."
        loaded = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if loaded:
            self.reference = loaded
