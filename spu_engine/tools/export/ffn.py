"""``--compact``'s FFN step: remove the neurons pruning killed, one width for every block.

A neuron whose output column is all zero is dead.  A neuron whose input row is all zero still outputs a constant,
act(its input bias), into its column: that constant times the column is added to the output bias first, and the
column zeroed, so it goes too (the outputs change by float rounding only).  Every block keeps the same width (the
widest block's live neurons; narrower blocks keep a few all-zero neurons) because the stock configs have one
``intermediate_size``; the folder stays loadable without custom code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spu_engine.methods.pruning.layout import ffn_layers
from spu_engine.model.compact_heads import slice_layer
from spu_engine.model.loading import find_block_list
from spu_engine.tools.export.errors import ExportError

FFN_WIDTH_KEYS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff", "ffn_hidden_size")
# BERT, GPT-2, DistilBERT, Llama: the activation's name on the FFN input's parent
ACTIVATIONS = ("intermediate_act_fn", "act", "activation", "act_fn")

Place = tuple[nn.Module, str, nn.Module]  # (parent, attribute, module)


def ffn_modules(block: nn.Module) -> tuple[list[nn.Module], nn.Module, list[Place]] | None:
    """The FFN input modules, the output module, and (parent, attribute, module) for each, in one block."""
    found = ffn_layers(block)
    if found is None:
        return None
    ins, out = found
    places = []
    for path in [*ins, out]:
        parent, _, attr = path.rpartition(".")
        places.append((block.get_submodule(parent), attr, block.get_submodule(path)))
    return [block.get_submodule(p) for p in ins], block.get_submodule(out), places


def neuron_rows(module: nn.Module, side: str) -> torch.Tensor:
    """The weight with one row per FFN neuron: output side of an input module, input side of the output module."""
    w = module.weight
    if isinstance(module, Conv1D):  # weight is [in, out]
        return w.t() if side == "out" else w
    return w if side == "out" else w.t()


def _zero_rows(module: nn.Module, side: str) -> torch.Tensor:
    """Which neurons have an all-zero row in ``module`` (``side`` as for ``neuron_rows``)."""
    return (neuron_rows(module, side) == 0).all(dim=1)


@torch.no_grad()
def fold_constant_neurons(ins: list[nn.Module], out: nn.Module, activation) -> int:
    """Neurons whose input row is all zero output act(bias) whatever the input: add act(bias) times their column to
    the output bias and zero the column, so they are dead.  One input layer (not gated) and an output bias (or a
    constant of zero) only.  Returns how many columns were folded."""
    if len(ins) != 1 or activation is None:
        return 0
    (up,) = ins
    silent = _zero_rows(up, "out")
    if not silent.any():
        return 0
    bias = (
        up.bias if up.bias is not None else torch.zeros(silent.numel(), dtype=up.weight.dtype, device=up.weight.device)
    )
    constant = activation(bias[silent])  # [n silent]
    columns = neuron_rows(out, "in")  # [neurons, hidden], a view of the weight
    folded = silent & (columns != 0).any(dim=1)
    if out.bias is None:  # nowhere to put a constant: only those of zero go
        zero = torch.zeros_like(silent)
        zero[silent] = constant == 0
        folded &= zero
    else:
        out.bias += (constant[:, None] * columns[silent]).sum(0)
    columns[folded] = 0
    return int(folded.sum())


def _activation(places: list[Place]):
    """The FFN's activation function, found next to its input layer; None if it has none of the known names."""
    parent = places[0][0]
    return next((fn for name in ACTIVATIONS if callable(fn := getattr(parent, name, None))), None)


def dead_neurons(ins: list[nn.Module], out: nn.Module) -> torch.Tensor:
    """Neurons that contribute nothing: zero output column, or a zero input row with zero bias (act(0) = 0 for the
    activations of these models; a single-input FFN's silent neurons were folded into zero columns already)."""
    dead = _zero_rows(out, "in")
    for m in ins:
        silent = _zero_rows(m, "out")
        if m.bias is not None:
            silent &= m.bias == 0
        dead |= silent
    return dead


@torch.no_grad()
def compact_ffn(model: nn.Module) -> tuple[int, int]:
    """Remove dead FFN neurons, keeping one width for all blocks; returns (old width, new width)."""
    _, blocks = find_block_list(model)
    found = [ffn_modules(b) for b in blocks]
    if any(f is None for f in found):
        raise ExportError(f"--compact: cannot find the FFN input/output layers of {type(model).__name__}'s blocks")
    for ins, out, places in found:
        fold_constant_neurons(ins, out, _activation(places))
    dead = [dead_neurons(ins, out) for ins, out, _ in found]
    old = dead[0].numel()
    width = max(1, max(int((~d).sum()) for d in dead))
    for (_ins, out, places), d in zip(found, dead):
        order = torch.argsort(d.to(torch.int8), stable=True)  # live neurons first, then dead ones as padding
        index = order[:width].sort().values
        for parent, attr, module in places:
            setattr(parent, attr, slice_layer(module, index, "in" if module is out else "out"))
    key = next((k for k in FFN_WIDTH_KEYS if getattr(model.config, k, None) == old), None)
    if key is None and getattr(model.config, "n_inner", "absent") is None:  # GPT-2: None means 4 * n_embd
        key = "n_inner"
    if key is None:
        raise ExportError(
            f"--compact: no FFN width ({', '.join(FFN_WIDTH_KEYS)}) equal to {old} in {type(model.config).__name__}"
        )
    setattr(model.config, key, width)
    return old, width
