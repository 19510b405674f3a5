"""An adapter larger than the layer it adapts: said before it is built, refused when it could not fit.

LoRA's factors of rank r on a ``d_out x d_in`` weight hold ``r (d_in + d_out)`` entries: more than the weight itself
once ``r > d_in d_out / (d_in + d_out)``, and from ``r = min(d_in, d_out)`` they are full rank, so the adapter can learn
nothing a full update of the layer could not (AdaLoRA's ``init_r`` likewise).  A Houlsby adapter whose bottleneck is
as wide as the hidden state is no bottleneck.  Such a setting stays allowed (a full-rank baseline is an experiment)
but is said, in the what-if and in the run's log when the tensors are built.  Refused before anything is allocated:
a rank above the larger side of a layer it adapts (most of it could never be used: r 100000 on a hidden size of 32
took 1.4 GB and 48 s to build), and tensors that, trained (weights, gradients, AdamW's two moments), would not fit
in the memory free on the device.
"""

from __future__ import annotations

from collections import Counter

import psutil
import torch
from torch import nn

from spu_engine.core.memory_view import size
from spu_engine.core.policy import PolicyError

TRAINING_COPIES = 4  # a trained tensor's weights, gradient and AdamW's two moments, each its size


def lora_layers(added: dict[str, int], params: dict[str, nn.Parameter]) -> Counter:
    """Entries added per adapted weight (by stable name), from the names of LoRA's tensors (``query.lora_A.weight``
    adapts ``query.weight``)."""
    layers: Counter = Counter()
    for name, n in added.items():
        base, sep, _ = name.partition(".lora_")
        if sep and f"{base}.weight" in params:
            layers[f"{base}.weight"] += n
    return layers


def lora_note(setting: str, value: int, added: dict[str, int], params: dict[str, nn.Parameter]) -> str | None:
    """The warning when some adapted layer gets factors with more entries than its weight; None when none does."""
    layers = lora_layers(added, params)
    larger = [n for n, k in layers.items() if k > params[n].numel() and params[n].dim() == 2]
    if not larger:
        return None
    example = larger[0]
    rows, cols = params[example].shape
    return (
        f"{setting} {value}: {len(larger)} of {len(layers)} adapted layers get an adapter larger than the layer itself "
        f"({example} {rows}x{cols}: {rows * cols:,} weights, its adapter {layers[example]:,}); from {setting} "
        f"{min(rows, cols)} an adapter is full rank and can learn nothing a full update of the layer could not. "
        f"{cost(added, params[example].dtype)}; {setting} {rows * cols // (rows + cols)} or less keeps each adapter no "
        "larger than its layer"
    )


def refuse_beyond(setting: str, value: int, added: dict[str, int], params: dict[str, nn.Parameter]) -> None:
    """PolicyError when some layer's factors have a rank above the larger side of its weight: no update of the layer
    has a rank above the smaller side, so the rest could never be used (r 100000 on a 32x32 projection is a typo)."""
    for name, k in lora_layers(added, params).items():
        if params[name].dim() != 2:
            continue
        rows, cols = params[name].shape
        if k // (rows + cols) > max(rows, cols):
            raise PolicyError(
                f"{setting} {value}: above {max(rows, cols)}, the larger side of {name} ({rows}x{cols}), whose updates "
                f"have rank {min(rows, cols)} at most, so most of the rank could never be used. {cost(added, params[name].dtype)}; "
                f"choose {setting} {min(rows, cols)} or less ({min(rows, cols)}: full rank)"
            )


def cost(added: dict[str, int], dtype: torch.dtype) -> str:
    """``The adapters add 51,200,000 parameters: 195 MiB of weights, 781 MiB with gradients and AdamW state``."""
    total = sum(added.values())
    weights = total * dtype.itemsize
    return (
        f"The adapters add {total:,} parameters: {size(weights)} of weights, "
        f"{size(TRAINING_COPIES * weights)} with gradients and AdamW state"
    )


def refuse_unfit(setting: str, value: int, added: dict[str, int], model: nn.Module) -> None:
    """PolicyError when the added tensors, trained, need more memory than the model's device has free."""
    p = next(model.parameters(), None)
    if p is None or p.is_meta:
        return
    need = TRAINING_COPIES * sum(added.values()) * p.dtype.itemsize
    free = free_bytes(p.device)
    if need > free:
        raise PolicyError(
            f"{setting} {value}: {cost(added, p.dtype)}, and {size(free)} is free on {p.device}: "
            f"they could not train; choose a smaller {setting}"
        )


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: on CUDA the driver's free memory and what torch holds unused, the
    machine's available RAM elsewhere."""
    if device.type == "cuda":  # plus what torch's caching allocator holds unused
        return (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
    return psutil.virtual_memory().available
