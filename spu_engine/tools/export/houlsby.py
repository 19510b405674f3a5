"""Load a Houlsby-adapter export without its remote code: the stock model from the folder, then the adapters.

``load(folder)`` is the one call the folder's README names for people with SPU installed (``spu eval`` uses it too):
it runs no code from the folder, unlike ``from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from spu_engine.model.houlsby import attach_adapters
from spu_engine.model.loading import AUTO_CLASSES
from spu_engine.tools.export.card import read_info
from spu_engine.tools.export.errors import ExportError


def load(folder: str | Path, kind: str | None = None) -> nn.Module:
    """The exported model with its adapters in place, in eval mode; ``kind`` (classification, qa, lm) defaults to
    the one ``spu_export.json`` names."""
    import transformers

    folder = Path(folder)
    kind = kind or (read_info(folder) or {}).get("model_kind")
    if kind not in AUTO_CLASSES:
        raise ExportError(f"{folder}: no spu_export.json naming the task; pass kind= one of {', '.join(AUTO_CLASSES)}")
    auto = getattr(transformers, AUTO_CLASSES[kind])
    model = auto.from_pretrained(folder, trust_remote_code=False)  # the stock class: the adapter tensors wait
    spec = getattr(model.config, "spu_houlsby", None)
    if not spec:
        raise ExportError(f"{folder}: config.json has no spu_houlsby (where the adapters go): not an adapter export")
    attach_adapters(model, spec)
    slots = tuple(f".{slot}." for _, slot in spec["sites"])
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        tensors.update({k: v for k, v in load_file(str(file)).items() if any(s in k for s in slots)})
    own = {n for n, _ in model.named_parameters() if any(s in n for s in slots)}
    if own - set(tensors):
        raise ExportError(f"{folder}: the adapter tensors {sorted(own - set(tensors))[:3]} are missing")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)
    return model.eval()
