"""What the SFT tests share: a tokenizer with a chat template, files of each data shape, a tiny Llama folder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sft_support import CHAT_TEMPLATE, SHAPES, write_jsonl
from support import build_tiny


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer):
    """The offline MiniLM tokenizer with a chat template (a copy: the shared one keeps none)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def shape_files(tmp_path_factory) -> dict[str, Path]:
    """A JSON Lines file of each shape's three examples."""
    folder = tmp_path_factory.mktemp("sft-shapes")
    return {
        shape: write_jsonl(folder / f"{shape.replace('/', '-')}.jsonl", [row for row, _, _ in examples])
        for shape, examples in SHAPES.items()
    }


@pytest.fixture(scope="session")
def gsm8k_like(tmp_path_factory) -> Path:
    """A folder with train and dev files in GSM8K's shape (question / answer ending in '#### N')."""
    folder = tmp_path_factory.mktemp("gsm8k-like")
    rows = [
        {"question": f"what is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        for a in range(1, 9)
        for b in range(1, 5)
    ]
    write_jsonl(folder / "train.jsonl", rows[:24])
    write_jsonl(folder / "dev.jsonl", rows[24:])
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """A tiny Llama causal LM saved as a local folder, with the chat tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama", chat_tokenizer, "lm", max_position_embeddings=256).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return folder
