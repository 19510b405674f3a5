"""Where a weight sits inside a transformer block: attention q/k/v/o or FFN in/out.

The console shows, for every block, how much of each sublayer was pruned;
structured pruning and the compact export use the same names to find the FFN
layers whose neurons they remove.  Names differ per architecture (BERT ``attention.self.query``,
DistilBERT ``attention.q_lin``, GPT-2 ``attn.c_attn`` (fused q/k/v), Llama
``self_attn.q_proj``), so each sublayer is a small regex.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

SUBLAYERS: list[tuple[str, re.Pattern[str]]] = [
    ("qkv", re.compile(r"\.(c_attn|qkv|qkv_proj|query_key_value|Wqkv)\.weight$")),
    ("q", re.compile(r"\.(query|q_proj|q_lin|q)\.weight$")),
    ("k", re.compile(r"\.(key|k_proj|k_lin|k)\.weight$")),
    ("v", re.compile(r"\.(value|v_proj|v_lin|v)\.weight$")),
    ("o", re.compile(r"(attention\.output\.dense|\.(o_proj|out_lin|out_proj|attn\.c_proj|dense_output))\.weight$")),
    ("ffn_in", re.compile(r"\.(intermediate\.dense|lin1|c_fc|up_proj|gate_proj|fc1|wi|w1|w3|dense_h_to_4h)\.weight$")),
    ("ffn_out", re.compile(r"(\.output\.dense|\.(lin2|mlp\.c_proj|down_proj|fc2|wo|w2|dense_4h_to_h))\.weight$")),
]


def sublayer(name: str) -> str:
    """'q', 'k', 'v', 'qkv', 'o', 'ffn_in', 'ffn_out' or 'other' for a parameter name."""
    for kind, pattern in SUBLAYERS:
        if pattern.search(name):
            return kind
    return "other"


def ffn_layers(block: nn.Module) -> tuple[list[str], str] | None:
    """Paths (inside ``block``) of its FFN input layers and of its one FFN output layer; None if it has no such pair."""
    ins, outs = [], []
    for name, module in block.named_modules():
        if name and isinstance(module, (nn.Linear, Conv1D)):
            kind = sublayer(f".{name}.weight")
            if kind == "ffn_in":
                ins.append(name)
            elif kind == "ffn_out":
                outs.append(name)
    return (ins, outs[0]) if ins and len(outs) == 1 else None
