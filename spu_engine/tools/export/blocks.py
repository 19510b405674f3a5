"""``--compact``'s block step: drop the GPT-2 blocks whose every attention head and FFN neuron is dead.

In a pre-LN block the LayerNorms sit inside the two branches, so such a block computes x + b_attn + b_ffn (its two
output biases) for every input x: it is dropped, ``n_layer`` lowered, and that constant added to the FFN output
bias of the block before it (to the position embeddings for a leading block), so the outputs stay equal up to
float rounding.  A post-LN block (BERT and its family) is never dropped: whatever its weights, it still applies its
two LayerNorms to the residual stream, and LN2(LN1(x)) = x holds for no setting of them (a LayerNorm's output has
its own mean and scale, and eps > 0), so removing it would change the outputs; the export says so in a note.
"""

from __future__ import annotations

import torch
from torch import nn

from spu_engine.model.compact_heads import attention_layout, dead_heads
from spu_engine.model.loading import find_block_list
from spu_engine.tools.export.ffn import dead_neurons, ffn_modules

# LayerNorm on the residual stream after each sublayer
POST_LN = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert")


@torch.no_grad()
def remove_blocks(model: nn.Module, notes: list[str]) -> tuple[int, int]:
    """Drop the blocks that only add a constant to the residual stream (GPT-2; see the module's docstring), moving
    the constant to the block before; a note for every dead block that stays, saying why.  Returns (before,
    after)."""
    path, blocks = find_block_list(model)
    idle = [i for i, b in enumerate(blocks) if _all_dead(b)]
    kind = model.config.model_type
    if not idle:
        return len(blocks), len(blocks)
    if kind != "gpt2":
        why = (
            "a post-LN block still applies its two LayerNorms to the residual stream, so removing it would "
            "change the outputs"
            if kind in POST_LN
            else f"removing blocks is implemented for GPT-2 only, not {type(model).__name__}"
        )
        notes.append(f"blocks {idle}: every attention head and FFN neuron is dead, but they stay: {why}")
        return len(blocks), len(blocks)
    if model.config.scale_attn_by_inverse_layer_idx or model.config.add_cross_attention:
        notes.append(
            f"blocks {idle}: every head and neuron is dead, but they stay: this GPT-2 scales attention by "
            "layer index or has cross-attention, which removing a block would change"
        )
        return len(blocks), len(blocks)
    gone = set(idle[1:] if len(idle) == len(blocks) else idle)  # a model keeps one block
    parent, _, attr = path.rpartition(".")
    for i in sorted(gone):
        shift = sum(m.bias for m in _output_layers(blocks[i]))  # the block computes x + shift, exactly
        before = [j for j in range(i) if j not in gone]
        if before:
            _output_layers(blocks[before[-1]])[1].bias += shift  # the block before now ends with + shift
        else:
            model.get_submodule(parent).wpe.weight += shift  # so does the input of the first block
    kept = nn.ModuleList(b for i, b in enumerate(blocks) if i not in gone)
    for i, block in enumerate(kept):  # the cache is indexed by position
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    setattr(model.get_submodule(parent), attr, kept)
    model.config.n_layer = len(kept)
    notes.append(
        f"blocks {sorted(gone)} removed: every attention head and FFN neuron was dead, so each only added "
        "its output biases to the residual stream; those now go into the FFN output bias of the block "
        "before (the position embeddings for block 0)"
    )
    return len(blocks), len(kept)


def _all_dead(block: nn.Module) -> bool:
    """Every attention head and FFN neuron of the block is dead (constant neurons are folded into zero columns
    first)."""
    ffn = ffn_modules(block)
    if ffn is None or attention_layout(block) is None:
        return False
    return bool(dead_neurons(ffn[0], ffn[1]).all()) and bool(dead_heads(block).all())


def _output_layers(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The attention output projection and the FFN output layer: what a block adds to the residual stream ends
    there."""
    return block.get_submodule(attention_layout(block)[2]), ffn_modules(block)[1]
