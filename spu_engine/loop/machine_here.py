"""This engine's ``core.machine.Machine``: read from torch, the device the model is on and the installed packages."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import torch

from spu_engine.core.machine import Machine


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_here(device: torch.device) -> Machine:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Machine(
        device=device.type,
        device_name=name,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=_version("transformers") or "?",
        peft=_version("peft"),
    )
