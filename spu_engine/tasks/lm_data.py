"""LM data on disk: the text's rows (a text file's lines, a table's text column) as an Arrow table, tokenized once
by ``datasets``' map into a cache file, and cut into blocks by a second cached map over the block numbers, which
slices the memory-mapped token ids: the blocks are those of the whole text's tokens, exactly as when the text was
read into memory (a block spans rows, the remainder of the text is dropped).

A row is tokenized a line at a time, as the whole text was: its text, with the newline that joined it to the next
row when the rows were joined by newlines, split into lines (``str.splitlines``, line ends kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spu_engine.core.data import (
    TEXT_ENCODING,
    DataError,
    is_local,
    load_hub_tables,
    pick_column,
    require_columns,
    split_files,
)
from spu_engine.tasks.arrow_features import Features, fingerprint, mapped, tokenizer_fingerprint
from spu_engine.tasks.arrow_rows import column_chunks, file_table, local_table
from spu_engine.tasks.classification import first_rows

TEXT = "text"


def text_tables(source: str, text_column: str | None, suffixes: tuple[str, ...]) -> dict[str, tuple[Any, str, str]]:
    """``train`` and ``eval`` (the same table when the data has one split) as tables of text rows, each with where
    it came from and its text column."""
    if not is_local(source):
        hub = load_hub_tables(source)
        out = {}
        for split, table in hub.items():
            src = f"{source} ({split})"
            head = [table[0]] if len(table) else []
            column = text_column or pick_column(head, TEXT_CANDIDATES) or TEXT
            require_columns(head, {"--text-column": column}, src)
            out[split] = (table, src, column)
        return {"eval": out["train"], **out}
    out = {}
    files = split_files(source)
    for split in ("train", "eval"):
        path = files[split]
        if split == "eval" and path == files["train"]:
            out[split] = out["train"]
        elif path.suffix.lower() in suffixes:
            out[split] = (_lines_table(path), str(path), TEXT)
        else:
            head = first_rows(path)
            column = text_column or pick_column(head, TEXT_CANDIDATES) or TEXT
            require_columns(head, {"--text-column": column}, str(path))
            out[split] = (local_table(path, (column,)), str(path), column)
    return out


TEXT_CANDIDATES = ("text", "content", "sentence", "document")


def _lines(path: str, stamp: tuple[int, int], version: int):
    """A text file's lines as ``read_text().splitlines(keepends=True)`` gives them (``stamp`` and ``version`` key
    the cache, unread here)."""
    try:
        with open(path, encoding=TEXT_ENCODING) as f:
            for line in f:
                for part in line.splitlines(keepends=True):
                    yield {TEXT: part}
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _lines_table(path: Path):
    return file_table(_lines, path, (TEXT,), {})


def token_table(table, src: str, column: str, tokenizer):
    """Each row's token ids (its lines tokenized without special tokens), through ``datasets``' cache."""
    import datasets
    import pyarrow.compute as pc

    kept_newline = all(
        pc.all(pc.or_(pc.equal(pc.utf8_length(pc.fill_null(chunk, "")), 0), pc.ends_with(chunk, "\n"))).as_py()
        is not False
        for chunk in column_chunks(table, column)
    )  # rows that keep their newline (hub WikiText) are joined as they are, others by a newline
    last = len(table) - 1

    def encode(batch: dict[str, list], numbers: list[int]) -> dict[str, list]:
        from transformers.utils import logging as hf_logging

        pieces = [
            str(value or "") + ("" if kept_newline or n == last else "\n") for value, n in zip(batch[column], numbers)
        ]
        lines = [piece.splitlines(keepends=True) for piece in pieces]
        flat = [line for row in lines for line in row]
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a long line exceeds model_max_length; blocks are cut later
        try:
            ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        finally:
            hf_logging.set_verbosity(verbosity)
        out, at = [], 0
        for row in lines:
            out.append([i for line_ids in ids[at : at + len(row)] for i in line_ids])
            at += len(row)
        return {"input_ids": out}

    listed = getattr(datasets, "List", None) or datasets.Sequence
    key = fingerprint(table._fingerprint, "lm tokens", tokenizer_fingerprint(tokenizer), column, kept_newline)
    return mapped(table, encode, datasets.Features({"input_ids": listed(datasets.Value("int32"))}), key, src)


def flat_ids(tokens):
    """All the token ids, in order, as one Arrow chunked array of the memory-mapped file's pages (nothing copied)."""
    import pyarrow as pa

    return pa.chunked_array([chunk.flatten() for chunk in tokens.data.column("input_ids").chunks], pa.int32())


def blocks(tokens, ids, start: int, end: int, size: int, limit: int | None, split: str, src: str) -> Features:
    """Blocks of ``size`` tokens of ``ids[start:end]`` (``flat_ids(tokens)``; the remainder dropped), the first
    ``limit`` of them, in a cache file beside ``tokens``'."""
    import os

    import datasets

    n = (end - start) // size
    if n == 0:
        raise DataError(
            f"{src}: the {split} text has {end - start} tokens, fewer than one block of --max-length {size}"
        )
    numbers = datasets.Dataset.from_dict({"block": list(range(min(n, limit or n)))})

    def cut(batch: dict[str, list], _: list[int]) -> dict[str, list]:
        rows = [ids.slice(start + b * size, size).to_pylist() for b in batch["block"]]
        return {"input_ids": rows, "labels": rows}

    listed = getattr(datasets, "List", None) or datasets.Sequence
    kinds = {k: listed(datasets.Value("int32")) for k in ("input_ids", "labels")}
    key = fingerprint(tokens._fingerprint, "lm blocks", start, end, size, limit)
    folder = os.path.dirname(tokens.cache_files[0]["filename"])
    name = os.path.join(folder, f"cache-{key}.arrow")
    return Features(mapped(numbers, cut, datasets.Features(kinds), key, src, cache_file_name=name))
