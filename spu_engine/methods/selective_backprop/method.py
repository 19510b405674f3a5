"""Selective Backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers").

A no-grad forward scores every drawn sample; the backward pass then runs on the
selected samples only, re-collated on their own (so padding shrinks to their
longest) with a second, grad-enabled forward.  There is never a masked
full-batch backward: the saving is real compute.

* ``threshold``: of each drawn batch keep the samples with loss >= threshold.
  A batch with none kept has no backward; its step still counts (the data was
  consumed and the learning-rate schedule moves on) but the optimizer has no
  gradient to apply, so every parameter stays as it was.
* ``percentile``: keep a sample with probability max(floor, CDF(loss)^beta),
  beta = 1/keep - 1, the CDF taken over the last ``history`` losses (as in the
  paper's reference code: E[U^beta] = keep for a uniform U).  Selected samples
  pool up; a step draws batches until the pool holds a full backward batch
  (``batch_size``) and carries the rest over to the next step.

Several processes select globally: every rank draws the same global batch
(``batch_size`` per rank), scores its own share, and the losses are gathered,
so the history, the random draws, the pool and the number of batches drawn
are the same on every rank (and the same as one process with the global
batch).  Each rank backpropagates its share of the selected samples, scaled
so that the averaged gradient is the mean over all of them; a rank with no
share contributes zeros, and a step where no rank kept a sample leaves every
gradient empty, so the optimizer does not step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spu_engine.core.policy import Policy
from spu_engine.methods.base import Host, Method, TrainingLoop
from spu_engine.methods.selective_backprop.settings import SelectiveBackprop as Settings


class SelectiveBackprop(Method):
    section = "selective_backprop"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.settings = Settings()
        self.history = torch.empty(0)  # recent per-sample losses on the CPU, newest last
        self.pool: list[int] = []  # percentile mode: selected train indices awaiting their backward batch
        self.skipped = 0  # samples drawn but never backpropagated, since the start of the run
        self.last_backward: list[int] = []  # train indices of the latest backward batch
        self.generator = torch.Generator().manual_seed(host.config.seed + 1)

    @property
    def active(self) -> bool:
        return self.settings.mode != "off"

    def configure(self, policy: Policy, step: int) -> None:
        new = policy.selective_backprop
        if new.mode != "percentile" and self.pool:
            self.skipped += len(self.pool)  # selected, but the mode that would have trained them is gone
            self.pool = []
        self.history = self.history[-new.history :]
        self.settings = new

    def sample_selector(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.select if self.active else None

    def own_loss_warning(self, policy: Policy) -> str | None:
        if policy.selective_backprop.mode != "off" or any(self.section in e.set for e in policy.timeline):
            return (
                "for selective backprop return callback.controller.selective_loss(...) from compute_loss "
                "(see examples/hf_trainer.py)"
            )
        return None

    def backward_share(self, policy: Policy) -> float | None:
        settings = policy.selective_backprop
        return {"off": 1.0, "percentile": settings.keep, "threshold": None}[settings.mode]

    def preview_notes(self, before: Policy, after: Policy) -> list[str]:
        if after.selective_backprop.mode == "threshold":
            return ["selective backprop (threshold): the kept share depends on the losses"]
        return []

    # ------------------------------------------------------------------ the step

    def forward_backward(self, loop: TrainingLoop) -> tuple[torch.Tensor, int, dict[str, Any]]:
        """The engine's forward and backward: mean loss over every drawn sample, samples this rank drew, and the
        step's selection statistics (a loop that draws its own batches uses ``select`` instead)."""
        dist = loop.dist
        world = dist.world_size if dist else 1
        bs = loop.config.batch_size * world  # the global batch: selection is the same on every rank
        losses: list[torch.Tensor] = []
        selected = 0
        while True:
            indices, loss = self._score(loop, bs)
            losses.append(loss)
            if not torch.isfinite(loss).all():  # the engine reports the non-finite mean and steps on nothing
                self.skipped += len(indices)
                backward = []
                break
            chosen = [i for i, k in zip(indices, self.select(loss).tolist()) if k]
            selected += len(chosen)
            if self.settings.mode == "threshold":
                backward = chosen
                break
            self.pool.extend(chosen)
            if len(self.pool) >= bs:
                backward, self.pool = self.pool[:bs], self.pool[bs:]
                break
        mine = dist.shard(backward) if dist else backward
        if backward:  # sum / (global count / world): after the ranks' average, the mean over the whole backward batch
            loop.train_on(mine, len(backward) / world)  # in the run's micro-batches; a rank with none keeps in step
        self.last_backward = backward
        drawn = torch.cat(losses)
        extra = {
            "sb_kept_fraction": round(selected / len(drawn), 4),
            "sb_backward": len(backward),
            "sb_skipped": self.skipped,
        }
        return drawn.mean(), len(drawn) // world, extra

    @torch.no_grad()
    def _score(self, loop: TrainingLoop, n: int) -> tuple[list[int], torch.Tensor]:
        """Draw ``n`` samples (the global batch) and their losses, without building a graph; each rank scores its share."""
        dist = loop.dist
        indices = loop.stream.take(n)
        loss = loop.losses_of(dist.shard(indices) if dist else indices)  # the whole batch, in micro-batches
        if dist:
            loss = dist.gather_shards(loss)
        return indices, loss.cpu()

    def select(self, loss: torch.Tensor) -> torch.Tensor:
        """Keep-mask of these per-sample losses (CPU), by the policy's rule and this method's own random stream, so
        any loop selects as the engine does; the samples not kept count as skipped."""
        if self.settings.mode == "threshold":
            keep = loss >= self.settings.threshold
        else:
            keep = torch.rand(len(loss), generator=self.generator) < self.keep_probability(loss)
        self.skipped += len(keep) - int(keep.sum())
        return keep

    def keep_probability(self, loss: torch.Tensor) -> torch.Tensor:
        """max(floor, CDF(loss)^beta) over the loss history, which first takes these losses in."""
        s = self.settings
        self.history = torch.cat([self.history, loss])[-s.history :]
        cdf = (self.history[None, :] <= loss[:, None]).float().mean(1)
        return cdf.pow(1.0 / s.keep - 1.0).clamp(min=s.floor)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.tolist(),
            "pool": list(self.pool),
            "skipped": self.skipped,
            "generator": self.generator.get_state().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.history = torch.tensor(state["history"], dtype=torch.float32)
        self.pool = list(state["pool"])
        self.skipped = int(state["skipped"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
