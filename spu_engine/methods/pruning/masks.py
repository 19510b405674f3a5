"""The one masking mechanism: pruned entries are zero in the weight itself, and stay zero.

A mask is applied to its parameter in place, so the forward pass, the
backward pass, ``state_dict()``, checkpoints and exports all see the pruned
weights at no cost per call.  (Hooks that multiply ``weight * mask`` in every
forward pass, as ``torch.nn.utils.prune`` does, cost 20 % of a MiniLM step on
CPU.)  One pass per step, ``reapply`` after the optimizer step, keeps pruned
entries at zero whatever the optimizer's momentum or weight decay would do.

Gradients are left as backward computed them: ``dL/dW'`` for every entry,
which movement pruning needs anyway.  (Masking them as well would leave Adam's
second moment at exactly zero for pruned entries, and ``sqrt`` of zeros runs
17x slower on x86 CPUs: a 15 % slower MiniLM step.)  With magnitude pruning
the optimizer state of a pruned entry keeps tracking its gradient, so a
regrown weight starts with warm statistics; movement puts it back after each
step instead, so a pruned weight neither learns nor drifts (``movement.py``).
Gradient-norm clipping sees those gradients too.

The parameter keeps its name (no ``weight_orig``), so freeze rules, units and
checkpoints see the usual names; masks are keyed by the stable name
(``model.stable_name``), so a PEFT wrapper added later changes nothing here.  The values under a mask are kept aside
(``latent``, zero where the mask keeps): a lower target regrows weights with
their own values, magnitude ranks pruned weights for regrowth, movement
scores get ``grad * weight`` for pruned weights too, and switching pruning
off brings the weights back.
"""

from __future__ import annotations

import torch
from torch import nn

from spu_engine.model.loading import stable_parameters
from spu_engine.model.sharded import laid_out_like, local, whole


class MaskedWeights:
    """Masks, and the latent values under them, for named weights of one model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}  # name -> 0/1 tensor in the weight's dtype
        self.latent: dict[str, torch.Tensor] = {}  # name -> the values pruned away (0 where kept)
        self._params: dict[str, nn.Parameter] = {}  # held once found: the tensor stays the same under any wrapper
        self.version = 0  # bumped on every mask change, so counts can be cached
        self.decided: dict[str, torch.Tensor] = {}  # name -> fingerprint of the whole mask chosen (alike on all ranks)
        self.held: dict[str, torch.Tensor] = {}  # name -> fingerprint of this rank's part of it, as installed

    def param(self, name: str) -> nn.Parameter:
        if name not in self._params:
            self._params[name] = stable_parameters(self.model)[name]
        return self._params[name]

    def keep(self, name: str) -> torch.Tensor:
        return self.masks[name] > 0

    def pruned(self, name: str) -> int:
        return self.masks[name].numel() - int(whole(self.masks[name].sum())) if name in self.masks else 0

    @torch.no_grad()
    def dense(self, name: str) -> torch.Tensor:
        """The weight with its pruned entries filled in from the latent values."""
        p = self.param(name).detach()
        return p + self.latent[name] if name in self.masks else p

    # -- changing masks ---------------------------------------------------------

    @torch.no_grad()
    def set(self, name: str, keep: torch.Tensor) -> None:
        """Install or replace the mask of weight ``name`` (``keep``: a bool tensor of its shape)."""
        dense = self.dense(name).clone()
        p = self.param(name)
        self.masks[name] = laid_out_like(keep.to(device=p.device, dtype=p.dtype), p)  # a shard's mask lives with it
        self._split(name, dense)
        self._record(name, keep)

    @torch.no_grad()
    def load(self, name: str, dense: torch.Tensor, keep: torch.Tensor) -> None:
        """Weight ``name`` is ``dense`` under mask ``keep`` (a checkpoint): whatever was latent before is forgotten."""
        p = self.param(name)
        self.masks[name] = laid_out_like(keep.to(device=p.device, dtype=p.dtype), p)
        self._split(name, laid_out_like(dense.to(device=p.device, dtype=p.dtype), p))
        self._record(name, keep)

    @torch.no_grad()
    def rebase(self, name: str) -> None:
        """The parameter was overwritten with dense values (an IMP reset): mask them again."""
        self._split(name, self.param(name).detach().clone())

    def _split(self, name: str, dense: torch.Tensor) -> None:
        mask = self.masks[name]
        self.param(name).copy_(dense * mask)
        self.latent[name] = dense * (1 - mask)
        self.version += 1

    @torch.no_grad()
    def drop(self, name: str) -> None:
        """Remove a mask: the latent values come back."""
        if name in self.masks:
            self.param(name).add_(self.latent.pop(name))
            del self.masks[name], self._params[name], self.decided[name], self.held[name]
            self.version += 1

    def _record(self, name: str, keep: torch.Tensor) -> None:
        """Fingerprints of the whole mask decided and of this rank's part (``rank_digest`` compares them)."""
        self.decided[name] = fingerprint(whole(keep))
        self.held[name] = fingerprint(local(self.masks[name]))

    def fingerprints(self) -> dict[str, tuple[list[float], bool]]:
        """Each mask: the fingerprint of the whole mask decided, and whether this rank's part still holds it."""
        return {
            n: (self.decided[n].tolist(), torch.equal(fingerprint(local(self.masks[n])), self.held[n]))
            for n in self.masks
        }

    def clear(self) -> None:
        for name in list(self.masks):
            self.drop(name)

    # -- every step ----------------------------------------------------------------

    @torch.no_grad()
    def reapply(self) -> None:
        for name, mask in self.masks.items():
            p = self.param(name)
            if p.requires_grad:  # a frozen weight cannot have moved
                p.mul_(mask)


def fingerprint(mask: torch.Tensor) -> torch.Tensor:
    """Two numbers that change when any entry of ``mask`` does: its sum, and its entries weighted by position."""
    flat = mask.detach().reshape(-1).double()
    return torch.stack(
        [flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)).sum()]
    )
