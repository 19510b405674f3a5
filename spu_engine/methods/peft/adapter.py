"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

In every block, after the attention output and after the feed-forward output
(after the projection back to the hidden size and its dropout, before the
residual add and layer norm), insert ``h + up(act(down(h)))`` with a bottleneck
of ``peft.size`` = m.  Each adapter has 2md + d + m parameters and starts near
the identity (weights ~ truncated N(0, 1e-2), biases 0).  The adapters, the
layer norms and the task head train; everything else is frozen, as in the paper.

An adapter is a child module of the sublayer it follows (``attn_adapter`` /
``ffn_adapter``), so its parameters carry the block's name prefix and land in
that block's unit, and no existing parameter is renamed; a forward hook on the
sublayer's output module applies it.
"""

from __future__ import annotations

from torch import nn

from spu_engine.core.policy import PolicyError
from spu_engine.methods.base import Host
from spu_engine.methods.peft.base import AddedTensorsMethod
from spu_engine.methods.peft.oversize import cost
from spu_engine.methods.peft.settings import Peft
from spu_engine.methods.targets import NameSets, norm_names, task_head_names
from spu_engine.model.houlsby import attach_adapters
from spu_engine.model.loading import find_block_list

SLOTS = ("attn_adapter", "ffn_adapter")

# model_type -> (attention output, feed-forward output): the module inside a block the adapter follows
SITES = {
    "bert": ("attention.output.dropout", "output.dropout"),
    "roberta": ("attention.output.dropout", "output.dropout"),
    "xlm-roberta": ("attention.output.dropout", "output.dropout"),
    "electra": ("attention.output.dropout", "output.dropout"),
    "distilbert": ("attention.out_lin", "ffn.dropout"),
    "gpt2": ("attn.resid_dropout", "mlp.dropout"),
}


class Adapter(AddedTensorsMethod):
    name = "adapter"
    fixed = ("size",)
    size_setting = "size"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.trainable = NameSets(host, norm_names, task_head_names)
        self.hooks: list = []
        self.slots: list[tuple[nn.Module, str]] = []

    def gate(self, name: str) -> bool:
        return any(f".{slot}." in name for slot in SLOTS) or name in self.trainable

    def oversize(self, settings: Peft) -> str | None:
        """A bottleneck as wide as the hidden state or wider is none: each adapter then outgrows a d x d projection."""
        d = getattr(getattr(self.host.model, "config", None), "hidden_size", None)
        if not d or settings.size < d:
            return None
        added = self.planned(settings)
        dtype = next(self.host.model.parameters()).dtype
        return (
            f"peft.size {settings.size}: the bottleneck is no narrower than the hidden size {d} it adapts, so each "
            f"adapter ({2 * settings.size * d + settings.size + d:,} parameters) is larger than a {d}x{d} layer. "
            f"{cost(added, dtype)}; a peft.size below {d} makes it a bottleneck again"
        )

    def install(self, settings: Peft) -> list[nn.Parameter]:
        params, self.hooks, self.slots = insert_adapters(self.host.model, settings.size)
        return params

    def add_to(self, model: nn.Module, settings: Peft) -> list[nn.Parameter]:
        return insert_adapters(model, settings.size)[0]

    def switch(self, on: bool) -> None:
        for parent, slot in self.slots:
            getattr(parent, slot).enabled = on

    def uninstall(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for parent, slot in self.slots:
            delattr(parent, slot)
        self.hooks, self.slots = [], []


def insert_adapters(model: nn.Module, size: int) -> tuple[list[nn.Parameter], list, list[tuple[nn.Module, str]]]:
    """Two adapters per block; returns their parameters, the forward hooks that apply them and where they are held."""
    hooks, slots = attach_adapters(model, adapter_spec(model, size))
    return [p for parent, slot in slots for p in getattr(parent, slot).parameters()], hooks, slots


def adapter_spec(model: nn.Module, size: int) -> dict:
    """Where the adapters of ``model`` go (``houlsby.attach_adapters``'s spec): after the attention and the
    feed-forward output of every block, found before anything changes."""
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if not d:
        raise PolicyError(
            f"peft.method: adapter: {type(model).__name__} has no config.hidden_size to size the adapters by"
        )
    path, blocks = find_block_list(model)
    sites = []
    for i, block in enumerate(blocks):
        for slot, site in zip(SLOTS, adapter_sites(model, block, d)):
            sites.append([f"{path}.{i}.{site}", slot])
    return {"size": size, "sites": sites}


def adapter_sites(model: nn.Module, block: nn.Module, d: int) -> tuple[str, str]:
    """The paths (in the block) of the attention and the feed-forward sublayer's output module."""
    paths = SITES.get(getattr(model.config, "model_type", ""))
    if paths is None or not all(_has(block, p) for p in paths):
        paths = _projection_paths(block, d)
    return paths


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def _projection_paths(block: nn.Module, d: int) -> tuple[str, str]:
    """Any architecture: the last projection back to width d inside the attention child, and the last one after it."""
    projections = [n for n, m in block.named_modules() if _out_features(m) == d]
    attention = next((n for n, _ in block.named_children() if "attn" in n.lower() or "attention" in n.lower()), None)
    in_attention = [n for n in projections if attention and n.startswith(attention + ".")]
    feed_forward = [n for n in projections if attention and not n.startswith(attention + ".")]
    if not in_attention or not feed_forward:
        raise PolicyError(
            f"peft.method: adapter: cannot find the attention and feed-forward outputs of a {type(block).__name__} block "
            f"(known architectures: {', '.join(SITES)}, and blocks with an attention child and projections back to width {d})"
        )
    return in_attention[-1], feed_forward[-1]


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style projection, weight [in, out]
        return module.weight.shape[1]
    return None
