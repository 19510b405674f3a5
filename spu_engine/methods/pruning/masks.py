"""The one masking mechanism: the forward pass sees ``weight * mask``.

Like ``torch.nn.utils.prune`` this works with module hooks, and never by
writing zeros into a weight (which an optimizer with momentum would revive).
Unlike it, the parameter keeps its name (``...query.weight``, not
``...weight_orig``), so freeze rules, units and checkpoints see the usual
names.  A forward pre-hook puts the masked tensor in the module's parameter
slot for the duration of the call, and a forward hook (``always_call``, so an
exception cannot leave it behind) puts the parameter back.  The gradient flows
through the product, so pruned entries get no gradient.

The parameter keeps its *latent* value under the mask, which is what lets a
lower target regrow weights by magnitude, and movement pruning (whose scores
get ``grad * weight`` through the straight-through estimator) regrow weights
by score.  ``state_dict()`` reports the masked values, so checkpoints and
exports hold plain pruned weights.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedWeights:
    """Masks (and optional straight-through scores) for named weights of one model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}  # name -> 0/1 tensor in the weight's dtype
        self.scores: dict[str, torch.Tensor] = {}  # name -> score parameter (straight-through)
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._handles: dict[str, list] = {}
        self._stash: dict[str, nn.Parameter] = {}
        self.version = 0  # bumped on every mask change, so counts can be cached

    # -- masks ---------------------------------------------------------------

    def set(self, name: str, keep: torch.Tensor) -> None:
        """Install or replace the mask of weight ``name`` (``keep`` is a bool tensor of its shape)."""
        p = self.model.get_parameter(name)
        mask = keep.to(device=p.device, dtype=p.dtype)
        self.version += 1
        if name in self.masks:
            self.masks[name].copy_(mask)
            return
        self.masks[name] = mask
        self._hook(name)

    def keep(self, name: str) -> torch.Tensor:
        return self.masks[name] > 0

    def drop(self, name: str) -> None:
        """Remove a mask: the forward pass sees the latent weight again."""
        self.version += 1
        self.masks.pop(name, None)
        self.scores.pop(name, None)
        for h in self._handles.pop(name, []):
            h.remove()
        self._owners.pop(name, None)

    def clear(self) -> None:
        for name in list(self.masks):
            self.drop(name)

    def param(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    @torch.no_grad()
    def effective(self, name: str) -> torch.Tensor:
        """The values the forward pass uses for weight ``name``."""
        p = self.model.get_parameter(name)
        return p * self.masks[name] if name in self.masks else p

    def pruned(self, name: str) -> int:
        return self.masks[name].numel() - int(self.masks[name].sum()) if name in self.masks else 0

    # -- hooks ---------------------------------------------------------------

    def _factor(self, name: str) -> torch.Tensor:
        mask = self.masks[name]
        s = self.scores.get(name)
        if s is None:
            return mask
        # straight-through: the value is the mask, the gradient reaches the scores as grad * weight
        return mask + (s - s.detach()).to(mask.dtype)

    def _hook(self, name: str) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        self._owners[name] = (module, attr)

        def swap_in(mod: nn.Module, _args) -> None:
            weight = mod._parameters[attr]
            self._stash[name] = weight
            mod._parameters[attr] = weight * self._factor(name)

        def swap_out(mod: nn.Module, _args, _output) -> None:
            weight = self._stash.pop(name, None)
            if weight is not None:
                mod._parameters[attr] = weight

        def masked_state(mod: nn.Module, state: dict, prefix: str, _meta) -> None:
            key = prefix + attr
            if key in state and name in self.masks:
                state[key] = state[key] * self.masks[name].to(state[key].dtype)

        self._handles[name] = [
            module.register_forward_pre_hook(swap_in),
            module.register_forward_hook(swap_out, always_call=True),
            module.register_state_dict_post_hook(masked_state),
        ]
