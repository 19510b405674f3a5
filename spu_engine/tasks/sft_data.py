"""SFT data on disk: the prompt / completion columns as Arrow tables (``arrow_rows``; a local file's values kept as
JSON, so a list of messages comes back as it was), rendered and tokenized once into ``datasets``' cache
(``arrow_features``), read a row at a time.

The map writes every row with what became of it (kept, cut, dropped: ``sft_render.fit``) and its reference
completion; the kept rows' features are a second cached map of that, so the counts a run reports and the
references generations are scored against come from the cache too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from spu_engine.core.data import DataError, is_local, no_rows, require_columns
from spu_engine.tasks.arrow_features import Features, fingerprint, mapped, tokenizer_fingerprint
from spu_engine.tasks.arrow_rows import local_table
from spu_engine.tasks.base import TaskOptions
from spu_engine.tasks.classification import split_heads
from spu_engine.tasks.sft_render import CUT, EMPTY, KEPT, TOO_LONG, Rendered, feature, fitted
from spu_engine.tasks.sft_shapes import SftColumns

STATUS, REFERENCE = "status", "reference"


def read_tables(source: str, options: TaskOptions) -> tuple[SftColumns, dict[str, tuple[Any, str]], bool]:
    """The columns, the ``train`` (and ``eval`` when the data has one) tables with where each came from, and
    whether their values are JSON text (a local file's) rather than Arrow's own (a hub dataset's)."""
    heads, named = split_heads(source)
    train_head, train_src = heads["train"]
    if not train_head:
        raise DataError(no_rows(train_src))
    columns = SftColumns.of(train_head, options.prompt_column, options.completion_column, train_src)
    for rows, src in heads.values():
        if not rows:
            raise DataError(no_rows(src))
        require_columns(rows, columns.wanted(), src)
    if not is_local(source):
        return columns, {s: (named[s], src) for s, (_, src) in heads.items()}, False
    wanted = tuple(c for c in (columns.prompt, columns.completion, columns.input) if c)
    optional = (columns.input,) if columns.input else ()
    return (
        columns,
        {s: (local_table(named[s], wanted, optional, as_json=True), src) for s, (_, src) in heads.items()},
        True,
    )


def encoded(table, columns: SftColumns, tokenizer, options: TaskOptions, template: str | None, src: str, as_json: bool):
    """The split's features (``Features``) and a ``Rendered`` of its counts, prompts and references (views)."""
    import datasets

    listed = getattr(datasets, "List", None) or datasets.Sequence
    ids = {k: listed(datasets.Value("int32")) for k in ("input_ids", "labels")}
    kinds = {**ids, "attention_mask": listed(datasets.Value("int8"))}
    key = [
        tokenizer_fingerprint(tokenizer),
        getattr(tokenizer, "chat_template", None),
        template,
        columns,
        options.max_length,
        src,
        as_json,
    ]
    every = mapped(
        table,
        _encoder(columns, tokenizer, options.max_length, template, src, as_json),
        datasets.Features({**kinds, STATUS: datasets.Value("int8"), REFERENCE: datasets.Value("string")}),
        fingerprint(table._fingerprint, "sft", key),
        src,
    )
    kept = mapped(
        every,
        _kept,
        datasets.Features({**kinds, REFERENCE: datasets.Value("string")}),
        fingerprint(every._fingerprint, "kept"),
        src,
    )
    counts = dict.fromkeys((KEPT, CUT, TOO_LONG, EMPTY), 0)
    for status in every.with_format("numpy")[STATUS] if len(every) else []:
        counts[int(status)] += 1
    features = Features(kept.remove_columns([REFERENCE]))
    return Rendered(
        features=features,
        prompts=Prompts(features),
        references=Column(kept.select_columns([REFERENCE]), REFERENCE),
        cut=counts[CUT],
        too_long=counts[TOO_LONG],
        empty=counts[EMPTY],
        total=len(table),
    )


def _encoder(columns: SftColumns, tokenizer, max_length: int, template: str | None, src: str, as_json: bool):
    def encode(batch: dict[str, list], numbers: list[int]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        if as_json:
            rows = [{k: None if v is None else json.loads(v) for k, v in row.items()} for row in rows]
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], STATUS: [], REFERENCE: []}
        for prompt, completion, status, reference in fitted(
            rows, numbers, columns, tokenizer, max_length, template, src
        ):
            for k, v in feature(prompt, completion).items():
                out[k].append(v)
            out[STATUS].append(status)
            out[REFERENCE].append(reference)
        return out

    return encode


def _kept(batch: dict[str, list], numbers: list[int]) -> dict[str, list]:
    """The rows trained on (kept whole or cut), without their status."""
    keep = [i for i, status in enumerate(batch[STATUS]) if status in (KEPT, CUT)]
    return {k: [v[i] for i in keep] for k, v in batch.items() if k != STATUS}


class Column(Sequence):
    """One column of a dataset as a list of its values, read a row at a time."""

    def __init__(self, dataset, name: str) -> None:
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.dataset[index][self.name]
        return self.dataset[index % len(self) if index < 0 else index][self.name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class Prompts(Column):
    """Each feature's prompt token ids: its ids where the labels mask them (-100 marks the prompt only)."""

    def __init__(self, features: Features) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.features[index]
        return row["input_ids"][: row["labels"].count(-100)]
