"""The console's one rule for shortening names (spu_tui.names): ends kept, siblings apart, the room respected."""

from __future__ import annotations

import pytest

from spu_tui.names import shorten, shorten_all
from spu_tui.widgets.unit_tree import short_count

BLOCK = [  # a BERT block's tensors after LoRA on query and value, as the tree lists them under the block
    "attention.self.query.weight",
    "attention.self.query.lora_A.weight",
    "attention.self.query.lora_B.weight",
    "attention.self.value.weight",
    "attention.self.value.lora_A.weight",
    "attention.self.value.lora_B.weight",
    "attention.output.dense.weight",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "output.LayerNorm.weight",
]


@pytest.mark.parametrize("room", [16, 20, 24, 30, 40])
def test_lora_query_and_value_stay_apart_and_every_name_keeps_its_end(room):
    shown = shorten_all(BLOCK, room)
    assert len(set(shown)) == len(BLOCK), shown
    for name, text in zip(BLOCK, shown, strict=True):
        assert len(text) <= room
        assert text.endswith("." + name.rsplit(".", 1)[1]), f"{name} lost its end: {text}"


def test_leading_parts_give_way_first_and_a_name_that_fits_is_whole():
    assert shorten("attention.output.LayerNorm.weight", 40) == "attention.output.LayerNorm.weight"
    assert shorten("attention.output.LayerNorm.weight", 20) == "a.o.LayerNorm.weight"
    assert shorten("attention.self.query.lora_A.weight", 16) == "a.s.q.l.weight"
    assert shorten("embeddings.word_embeddings.weight", 8) == "…weight"
    assert shorten("embeddings.word_embeddings.weight", 4) == "…ght", "only a leaf longer than the room is cut"


def test_the_parts_that_tell_siblings_apart_stay_whole():
    # alone, lora_A shrinks to its initial; beside lora_B that would read the same twice
    assert shorten_all(BLOCK[1:3], 16) == ["…q.lora_A.weight", "…q.lora_B.weight"]
    assert shorten("self.query.weight", 12) == shorten("self.quant.weight", 12) == "s.q.weight"
    assert shorten_all(["self.query.weight", "self.quant.weight"], 12) == ["…uery.weight", "…uant.weight"]


def test_counts_take_five_columns_at_most():
    assert [short_count(n) for n in (999, 8_832, 147_456, 980_864, 999_999, 22_700_000, 110_000_000)] == [
        "999",
        "8.8k",
        "147k",
        "981k",
        "1000k",
        "22.7M",
        "110M",
    ]
