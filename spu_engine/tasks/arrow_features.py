"""Tokenized features on disk: ``datasets``' map writes them once to a cache file keyed by what they depend on (the
rows, the tokenizer, the options), a later run on the same data loads that file, and ``Features`` reads one row at
a time, so memory is bounded by the batch, not the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from spu_engine.core.data import DataError
from spu_engine.tasks.arrow_rows import cache_note, quiet

FEATURES_VERSION = 1  # bump when an encoding changes for the same inputs
MAP_BATCH = 1000  # rows tokenized (and written) at a time


def tokenizer_fingerprint(tokenizer) -> str:
    """What a tokenizer's ids depend on: its class and vocabulary and rules (a fast tokenizer's JSON, less the
    truncation and padding a call sets), else ``datasets``' hash of the object."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from datasets.fingerprint import Hasher

        return Hasher.hash(tokenizer)
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    text = json.dumps([type(tokenizer).__name__, spec, tokenizer.special_tokens_map], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([FEATURES_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:32]


def encoded(
    table, encode: Callable[[dict[str, list], list[int]], dict[str, list]], features, key: str, what: str
) -> Features:
    """``encode`` (a batch of columns and its row numbers -> feature columns) over ``table``, through a cache file
    beside the table's, named by ``key`` (which must change with anything the features depend on)."""
    return Features(mapped(table, encode, features, key, what))


def mapped(
    table, encode: Callable[[dict[str, list], list[int]], dict[str, list]], features, key: str, what: str, **more
):
    """``encoded``'s ``datasets.Dataset`` (``encode`` may give fewer rows than it is given: the rest are dropped;
    ``more``: map's other arguments, a cache file's name for a table held in memory)."""
    try:
        with quiet():
            return table.map(
                encode,
                batched=True,
                batch_size=MAP_BATCH,
                with_indices=True,
                remove_columns=table.column_names,
                features=features,
                new_fingerprint=key,
                desc=f"tokenizing {what}",
                **more,
            )
    except OSError as exc:
        raise DataError(cache_note(exc)) from None


def select(table, rows, key: str):
    """The rows numbered ``rows`` (file order), fingerprinted by ``key`` (hashing a million row numbers is slow)."""
    return table.select(rows, new_fingerprint=fingerprint(table._fingerprint, key))


class Features(Sequence):
    """A ``datasets.Dataset`` of features seen as the list of feature dicts the tasks built before: an index reads
    one row from the memory-mapped file, a slice a few."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            columns = self.dataset[index]
            return [dict(zip(columns, values)) for values in zip(*columns.values())]
        if index < 0:
            index += len(self)
        return self.dataset[int(index)]

    def __eq__(self, other: object) -> bool:
        """Equal to the same features however held (a list of dicts, as tests and older tasks have them)."""
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), MAP_BATCH):
            yield from self[start : start + MAP_BATCH]

    def lengths(self) -> list[int]:
        """Tokens of each example, from the list offsets alone (no token is read); ``map`` wrote the table, so its
        rows are the dataset's, in order."""
        import pyarrow.compute as pc

        column = self.dataset.data.column("input_ids")
        return [n for chunk in column.chunks for n in pc.list_value_length(chunk).to_pylist()]
