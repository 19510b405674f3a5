"""A run's checkpoint in its model: the weights loaded into the run's architecture, LoRA / AdaLoRA merged into
them, and every pruned weight multiplied by its mask."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from spu_engine.core.policy import Peft
from spu_engine.methods.peft.adalora import inject_adalora
from spu_engine.methods.peft.inject import eject, inject
from spu_engine.methods.peft.lora import lora_config
from spu_engine.model.loading import load_model, stable_name
from spu_engine.tools.export.errors import ExportError
from spu_engine.tools.export.probe import probe_batch

MASK_PREFIX = "PruningMethod/mask."
LORA_METHODS = ("lora", "adalora")


def load_into(
    name: str, kind: str, tensors: dict[str, torch.Tensor], peft: Peft | None = None, steps: int | None = None
) -> nn.Module:
    """The run's architecture with the checkpoint's weights (num_labels read off the checkpoint's head); LoRA and
    AdaLoRA are put in as the run had them (their tensors are the checkpoint's, so no initialisation matters)."""
    model = load_model(name, kind)
    mismatched = _other_shapes(tensors, model.state_dict())
    if mismatched and kind == "classification":
        model = load_model(name, kind, num_labels=tensors[mismatched[0]].shape[0])
    if peft is not None and peft.method in LORA_METHODS:
        with torch.random.fork_rng(devices=[]):
            if peft.method == "lora":
                inject(model, lora_config(model, peft, init=True), "peft")
            else:
                inject_adalora(model, peft, steps)
    own = {stable_name(n): t for n, t in model.state_dict().items()}
    live = {stable_name(n): n for n in model.state_dict()}
    mismatched = _other_shapes(tensors, own)
    unexpected = [n for n in tensors if n not in own]
    if mismatched or unexpected:
        raise ExportError(
            f"the checkpoint does not fit {name}: "
            + (f"tensors of another shape {mismatched[:3]} " if mismatched else "")
            + (
                f"tensors the model lacks {unexpected[:3]} (adapters and (IA)3 are not folded by export)"
                if unexpected
                else ""
            )
        )
    model.load_state_dict({live[n]: t for n, t in tensors.items()}, strict=False)
    return model.eval()


def _other_shapes(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """The names of ``tensors`` that ``own`` has in another shape."""
    return [n for n, t in tensors.items() if n in own and own[n].shape != t.shape]


@torch.no_grad()
def merge_lora(model: nn.Module) -> float:
    """Merge every LoRA / AdaLoRA layer into its base weight (peft's ``merge``: DoRA's magnitude, rsLoRA's scaling,
    AdaLoRA's kept singular values; after PiSSA the base holds the residual, so the merge gives the trained W) and
    drop the adapters; the largest output difference, merged vs adapted, on a probe batch."""
    batch = probe_batch(model.config, length=32)
    before = model(**batch)[0]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    eject(model)
    return float((model(**batch)[0] - before).abs().max())


@torch.no_grad()
def fold_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Multiply each masked weight by its mask; returns (masked entries, zeros among them)."""
    params = dict(model.named_parameters())
    total = zeros = 0
    for name, keep in masks.items():
        if name not in params:
            raise ExportError(f"mask for {name!r}, which this model does not have")
        p = params[name]
        p.mul_(keep.to(p.device, p.dtype))
        total += p.numel()
        zeros += int((p == 0).sum())
    return total, zeros
