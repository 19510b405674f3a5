"""Parameter classes several methods gate on: biases, normalisation layers, the task head."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from spu_engine.model.loading import stable_name, stable_parameters

if TYPE_CHECKING:
    from spu_engine.methods.base import Host


def is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def task_head_names(model: nn.Module) -> set[str]:
    """Parameters outside ``model.base_model``: the newly initialised task head (classifier, score, qa_outputs).

    An LM's head (its output embeddings, tied to the input ones or not: GPT-2's, Llama's ``lm_head``) comes
    pretrained, so it is not a new head: under PEFT it stays frozen, as peft's causal-LM setups keep it.
    """
    base = getattr(model, "base_model", model)
    if base is model:
        return set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = {id(p) for p in base.parameters()} | {id(p) for p in (output.parameters() if output is not None else ())}
    return {n for n, p in stable_parameters(model).items() if id(p) not in inside}


def norm_names(model: nn.Module) -> set[str]:
    """Parameters of LayerNorm / RMSNorm modules (any class whose name says Norm)."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower():
            out.update(stable_name(f"{prefix}.{n}" if prefix else n) for n, _ in module.named_parameters(recurse=False))
    return out


class NameSets:
    """Name sets of a model, recomputed only when the host's parameter list changes."""

    def __init__(self, host: Host, *functions: Callable[[nn.Module], set[str]]) -> None:
        self.host = host
        self.functions = functions
        self._key: int | None = None
        self._names: set[str] = set()

    def __contains__(self, name: str) -> bool:
        if self._key != id(self.host.param_names):
            self._names = set().union(*(f(self.host.model) for f in self.functions))
            self._key = id(self.host.param_names)
        return name in self._names
