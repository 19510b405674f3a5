"""A run's checkpoint in its model: the weights loaded into the run's architecture with the PEFT tensors the run
added (LoRA, AdaLoRA, (IA)3, Houlsby adapters), every pruned weight multiplied by its mask, and peft's tuners merged
into the weights when asked."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from spu_engine.core.policy import Peft
from spu_engine.methods.peft.adalora import inject_adalora
from spu_engine.methods.peft.adapter import adapter_spec
from spu_engine.methods.peft.ia3 import ia3_config
from spu_engine.methods.peft.inject import eject, inject
from spu_engine.methods.peft.lora import lora_config
from spu_engine.model.houlsby import attach_adapters
from spu_engine.model.loading import load_model, stable_name, stable_parameters
from spu_engine.tools.export.errors import ExportError
from spu_engine.tools.export.probe import probe_batch

MASK_PREFIX = "PruningMethod/mask."
TUNER_METHODS = ("lora", "adalora", "ia3")  # peft's tuners: an adapter folder, or merged with --merge


def load_into(
    name: str,
    kind: str,
    tensors: dict[str, torch.Tensor],
    peft: Peft | None = None,
    steps: int | None = None,
    methods: dict | None = None,
    pooling: str | None = None,
) -> nn.Module:
    """The run's architecture with the checkpoint's weights (num_labels read off the checkpoint's head); the tensors
    a PEFT method added are put in as the run had them (their values are the checkpoint's, so no initialisation
    matters); ``methods`` is the checkpoint's method state (AdaLoRA's kept ranks); ``pooling`` the run's."""
    model = load_model(name, kind, pooling=pooling)
    mismatched = _other_shapes(tensors, model.state_dict())
    if mismatched and kind == "classification":
        model = load_model(name, kind, num_labels=tensors[mismatched[0]].shape[0], pooling=pooling)
    if peft is not None:
        with torch.random.fork_rng(devices=[]):
            _add_peft(model, peft, steps, methods or {})
    own = {stable_name(n): t for n, t in model.state_dict().items()}
    live = {stable_name(n): n for n in model.state_dict()}
    mismatched = _other_shapes(tensors, own)
    unexpected = [n for n in tensors if n not in own]
    if mismatched or unexpected:
        raise ExportError(
            f"the checkpoint does not fit {name}: "
            + (f"tensors of another shape {mismatched[:3]} " if mismatched else "")
            + (f"tensors the model lacks {unexpected[:3]}" if unexpected else "")
        )
    model.load_state_dict({live[n]: t for n, t in tensors.items()}, strict=False)
    return model.eval()


def _add_peft(model: nn.Module, peft: Peft, steps: int | None, methods: dict) -> None:
    """The run's PEFT method, put into ``model`` as it trained it."""
    if peft.method == "lora":
        inject(model, lora_config(model, peft, init=True), "peft")
    elif peft.method == "ia3":
        inject(model, ia3_config(model, peft), "peft")
    elif peft.method == "adalora":
        tuner = inject_adalora(model, peft, steps)[1]
        live = {stable_name(n): n for n, _ in model.named_parameters()}
        kept = methods.get("AdaLoRA", {}).get("rank_pattern") or {}
        tuner.peft_config["default"].rank_pattern = {live.get(k, k): v for k, v in kept.items()} or None
    elif peft.method == "adapter":
        spec = adapter_spec(model, peft.size)
        attach_adapters(model, spec)
        model.config.spu_houlsby = spec  # saved in config.json: where the exported folder's code puts them


def _other_shapes(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """The names of ``tensors`` that ``own`` has in another shape."""
    return [n for n, t in tensors.items() if n in own and own[n].shape != t.shape]


@torch.no_grad()
def merge_tuners(model: nn.Module) -> float:
    """Merge every LoRA / AdaLoRA / (IA)3 layer into its base weight (peft's ``merge``: DoRA's magnitude, rsLoRA's
    scaling, AdaLoRA's kept singular values, (IA)3's scales; after PiSSA the base holds the residual, so the merge
    gives the trained W) and drop the tuners; the largest output difference, merged vs adapted, on a probe batch."""
    batch = probe_batch(model.config, length=32)
    before = model(**batch)[0]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    eject(model)
    return float((model(**batch)[0] - before).abs().max())


@torch.no_grad()
def fold_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Multiply each masked weight (by stable name: a LoRA target's base weight too) by its mask; returns (masked
    entries, zeros among them)."""
    params = stable_parameters(model)
    total = zeros = 0
    for name, keep in masks.items():
        if name not in params:
            raise ExportError(f"mask for {name!r}, which this model does not have")
        p = params[name]
        p.mul_(keep.to(p.device, p.dtype))
        total += p.numel()
        zeros += int((p == 0).sum())
    return total, zeros
