"""Gradual magnitude pruning (Zhu & Gupta 2017): remove the smallest |w| on the cubic schedule."""

from __future__ import annotations

import torch

from spu_engine.methods.pruning.base import ScheduledPruner


class MagnitudePruner(ScheduledPruner):
    name = "magnitude"

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        # the latent |w| of pruned weights ranks them for regrowth when the target is lowered
        return self.kept_first({n: self.masks.dense(n).abs().float() for n in self.targets})
