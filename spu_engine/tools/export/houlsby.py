"""Load an adapter export the way ``spu eval`` does, running no code from the folder.

``load(folder)`` is the one call a Houlsby folder's README names for people with SPU installed: the stock model
from the folder, then the adapters, unlike ``from_pretrained(folder, trust_remote_code=True)``.  ``load_export``
also loads a peft folder onto its base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from spu_engine.model.houlsby import attach_adapters
from spu_engine.model.loading import AUTO_CLASSES, load_model, name_classes
from spu_engine.model.pooling import use_pooling
from spu_engine.tools.export.card import read_info
from spu_engine.tools.export.errors import ExportError


def load(folder: str | Path, kind: str | None = None) -> nn.Module:
    """The exported model with its adapters in place (and its pooling), in eval mode; ``kind`` (classification, qa, lm) defaults to
    the one ``spu_export.json`` names."""
    import transformers

    folder = Path(folder)
    kind = kind or (read_info(folder) or {}).get("model_kind")
    if kind not in AUTO_CLASSES:
        raise ExportError(f"{folder}: no spu_export.json naming the task; pass kind= one of {', '.join(AUTO_CLASSES)}")
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, AUTO_CLASSES[kind])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the stock class lists the adapter tensors as unexpected: they come next
    try:
        model = auto.from_pretrained(folder, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    spec = getattr(model.config, "spu_houlsby", None)
    if not spec:
        raise ExportError(f"{folder}: config.json has no spu_houlsby (where the adapters go): not an adapter export")
    attach_adapters(model, spec)
    if getattr(model.config, "spu_pooling", None):
        use_pooling(model, model.config.spu_pooling)
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


def load_export(folder: Path, info: dict) -> nn.Module:
    """An adapter export as the run computed it (``spu eval``): a peft folder on its base model with peft's layers
    left in place, as they were in training; a Houlsby folder with its adapters."""
    from peft import PeftModel

    kind = info["model_kind"]
    if info["format"] == "houlsby":
        return load(folder, kind)
    labels = info.get("labels")
    base = load_model(info["base_model"], kind, num_labels=len(labels) if labels else None, pooling=info.get("pooling"))
    model = PeftModel.from_pretrained(base, folder).get_base_model()
    name_classes(model, labels)
    return model.eval()
