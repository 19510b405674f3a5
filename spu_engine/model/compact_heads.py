"""Remove attention heads from a stock transformers model, block by block.

transformers 5 dropped ``prune_heads``, and the stock configs derive the head
size from ``hidden_size / num_heads``, so a model with a different number of
heads per layer cannot be written as a stock config.  ``spu export --compact``
therefore copies this file into the exported folder as ``spu_compact.py``
(with a subclass of the model's own class appended) and names it in
``config.json``'s ``auto_map``: ``AutoModelFor*.from_pretrained(folder,
trust_remote_code=True)`` builds the stock model, narrows the attention layers
listed in ``config.spu_compact``, then loads the (smaller) weights.

Self-contained on purpose: it imports only torch and transformers.  It knows
the three attention layouts of the supported families (BERT/RoBERTa-style
query/key/value, DistilBERT's q_lin/k_lin/v_lin, GPT-2's fused c_attn); the
stock forward passes reshape with ``-1`` heads, so only the projections and
a few size attributes change.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# attention module (relative to a block), its q/k/v projections (one name: fused), output projection, head size and count attributes
LAYOUTS = (
    (
        "attention.self",
        ("query", "key", "value"),
        "attention.output.dense",
        "attention_head_size",
        {"num_attention_heads": 1, "all_head_size": "width"},
    ),
    ("attention", ("q_lin", "k_lin", "v_lin"), "attention.out_lin", "attention_head_size", {"n_heads": 1}),
    ("attn", ("c_attn",), "attn.c_proj", "head_dim", {"num_heads": 1, "split_size": "width"}),
)


def slice_layer(module: nn.Module, index: torch.Tensor, side: str) -> nn.Module:
    """A copy of a Linear / Conv1D keeping only features ``index`` of its ``side`` ('out' or 'in')."""
    w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if isinstance(module, Conv1D):  # weight is [in, out]
        w = w[:, index] if side == "out" else w[index, :]
        new = Conv1D(w.shape[1], w.shape[0])
    else:
        w = w[index, :] if side == "out" else w[:, index]
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b[index] if side == "out" else b)
    return new


def attention_layout(block: nn.Module) -> tuple | None:
    """The entry of LAYOUTS that matches this block, or None."""
    for layout in LAYOUTS:
        attn_path, qkv, out_path, _, _ = layout
        try:
            attn = block.get_submodule(attn_path)
            block.get_submodule(out_path)
        except AttributeError:
            continue
        if all(isinstance(getattr(attn, n, None), (nn.Linear, Conv1D)) for n in qkv):
            return layout
    return None


def head_count(block: nn.Module) -> int:
    attn_path, _, out_path, size_attr, _ = attention_layout(block)
    out = block.get_submodule(out_path)
    width = out.weight.shape[0] if isinstance(out, Conv1D) else out.weight.shape[1]
    return width // getattr(block.get_submodule(attn_path), size_attr)


@torch.no_grad()
def dead_heads(block: nn.Module) -> torch.Tensor:
    """Bool per head: its output projection columns are all zero, or its values (weights and bias) are."""
    attn_path, qkv, out_path, size_attr, _ = attention_layout(block)
    attn, out = block.get_submodule(attn_path), block.get_submodule(out_path)
    size, heads = getattr(attn, size_attr), head_count(block)
    out_w = out.weight if isinstance(out, Conv1D) else out.weight.t()  # [heads * size, hidden]
    dead = (out_w.reshape(heads, -1) == 0).all(dim=1)
    value = getattr(attn, qkv[-1])
    rows = value.weight.t() if isinstance(value, Conv1D) else value.weight  # [out, in]
    bias = value.bias
    if len(qkv) == 1:  # fused q|k|v: the value part is the last third
        rows, bias = rows[2 * heads * size :], None if bias is None else bias[2 * heads * size :]
    silent = (rows.reshape(heads, -1) == 0).all(dim=1)
    if bias is not None:
        silent &= (bias.reshape(heads, size) == 0).all(dim=1)
    return dead | silent


def keep_heads(block: nn.Module, kept: list[int]) -> None:
    """Narrow the block's attention to heads ``kept`` (indices into its current heads)."""
    attn_path, qkv, out_path, size_attr, counts = attention_layout(block)
    attn = block.get_submodule(attn_path)
    size, heads = getattr(attn, size_attr), head_count(block)
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept])
    if len(qkv) == 1:  # fused: the same heads from each of q, k and v
        index_in = torch.cat([index + i * heads * size for i in range(3)])
        setattr(attn, qkv[0], slice_layer(getattr(attn, qkv[0]), index_in, "out"))
    else:
        for name in qkv:
            setattr(attn, name, slice_layer(getattr(attn, name), index, "out"))
    parent_path, _, out_attr = out_path.rpartition(".")
    parent = block.get_submodule(parent_path)
    setattr(parent, out_attr, slice_layer(getattr(parent, out_attr), index, "in"))
    for attr, unit in counts.items():
        setattr(attn, attr, len(kept) * (size if unit == "width" else 1))


def remove_heads(model: nn.Module, spec: dict) -> None:
    """Apply ``config.spu_compact``: {"blocks": path of the block list, "heads": {block index: kept heads}}."""
    blocks = model.get_submodule(spec["blocks"])
    for i, kept in spec["heads"].items():
        keep_heads(blocks[int(i)], kept)
