"""What a run trains with: the device and autocast dtype, and the optimizer (fused AdamW, no decay on biases and
norms)."""

from __future__ import annotations

import torch

from spu_engine.core.config import EngineConfig
from spu_engine.loop.distributed import Distributed

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_", "norm.weight")
FUSED_DEVICES = ("cuda", "cpu", "mps", "xpu")  # where torch has a fused AdamW


def pick_device(config: EngineConfig, dist: Distributed | None) -> tuple[torch.device, torch.dtype | None]:
    """The device to train on and the autocast dtype (None: fp32); bf16 where the GPU has it, else fp16 with a scaler."""
    if dist is not None:
        device = dist.device
    else:
        device = torch.device(
            config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
    if config.precision == "fp32" or device.type != "cuda":
        return device, None
    bf16 = config.precision == "bf16" or (config.precision == "auto" and torch.cuda.is_bf16_supported())
    return device, torch.bfloat16 if bf16 else torch.float16


def build_optimizer(model: torch.nn.Module, config: EngineConfig) -> torch.optim.Optimizer:
    """AdamW over every parameter (frozen ones get no gradient, so no update), no weight decay on biases and norms;
    fused, so a non-finite step is skipped on the device without asking the host (``Trainer._optimizer_step``)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if any(k in n for k in NO_DECAY) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    device = next(model.parameters()).device.type
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=device in FUSED_DEVICES)
    for g in opt.param_groups:
        g["base_lr"] = config.lr
    return opt
