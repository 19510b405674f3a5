"""``--compact``'s attention step: remove the dead heads of every block (``compact_heads.py`` does the slicing).

A head is dead when its output-projection columns are all zero, or its value weights and bias are; one head stays
where all died.  Stock configs cannot say "a different number of heads per layer", so the heads each block keeps
go into ``config.spu_compact``, and the folder gets the code that removes them on loading (``save.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from spu_engine.model.compact_heads import attention_layout, dead_heads, head_count, keep_heads
from spu_engine.model.loading import find_block_list


@torch.no_grad()
def compact_attention(model: nn.Module) -> tuple[int, int] | None:
    """Remove dead attention heads block by block; returns (heads before, heads after), None for an unknown
    layout."""
    path, blocks = find_block_list(model)
    if any(attention_layout(b) is None for b in blocks):
        return None
    before = after = 0
    kept_per_block: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        dead = dead_heads(block)
        kept = [h for h in range(head_count(block)) if not dead[h]] or [0]  # a block needs one head to reshape
        before, after = before + dead.numel(), after + len(kept)
        if len(kept) < dead.numel():
            keep_heads(block, kept)
            kept_per_block[str(i)] = kept
    if kept_per_block:
        model.config.spu_compact = {"blocks": path, "heads": kept_per_block}
    return before, after
