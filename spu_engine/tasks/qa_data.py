"""SQuAD data on disk: one row a question (id, question, context, answers, group) in an Arrow table, checked once
as it is written (``arrow_rows``; a hub dataset through a cached map), then cut into windows of tokens once into
``datasets``' cache (``arrow_features``) and read a row at a time, so memory does not grow with the file.

A window is labelled with the token span of the first reference answer, or position 0 (the CLS token) when the
answer is not wholly inside it.  Eval windows also keep each token's character span in the context (-1 outside it),
which turns a predicted span back into text.  A nested SQuAD JSON file is parsed whole once, when its table is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spu_engine.core.data import (
    TEXT_ENCODING,
    DataError,
    eval_share,
    is_local,
    iter_rows,
    load_hub_tables,
    no_eval_split_note,
    split_files,
)
from spu_engine.tasks.arrow_features import Features, fingerprint, mapped, select, tokenizer_fingerprint
from spu_engine.tasks.arrow_rows import column_chunks, file_table
from spu_engine.tasks.base import TaskOptions

COLUMNS = ("id", "question", "context", "answers", "group")  # answers: JSON [[answer_start, text], ...]
TARGETS = ("start_positions", "end_positions")


@dataclass
class Example:
    id: str
    question: str
    context: str
    answers: list[tuple[int, str]]  # (character offset into context, text)
    group: str  # article title (or context): a held-out split never shares a context with training


class Rows(Features):
    """A table's rows each made into what ``read`` builds of it (a question, a window), read a row at a time."""

    def __init__(self, table, read: Callable[[dict[str, Any]], Any]) -> None:
        super().__init__(table)
        self.read = read

    def __getitem__(self, index):
        rows = super().__getitem__(index)
        return [self.read(r) for r in rows] if isinstance(index, slice) else self.read(rows)


def questions(table) -> Rows:
    """A question table seen as a list of ``Example``s."""
    return Rows(table, _example)


def _example(row: dict[str, str]) -> Example:
    answers = [(int(start), str(text)) for start, text in json.loads(row["answers"])]
    return Example(row["id"], row["question"], row["context"], answers, row["group"])


def windows_seen(table) -> Rows:
    """Eval windows seen as (question index, each token's (start, end) in the context or None)."""
    return Rows(table, _window)


def _window(row: dict[str, Any]) -> tuple[int, list]:
    spans = zip(row["offset_start"], row["offset_end"])
    return row["example"], [None if s < 0 else (s, e) for s, e in spans]


class Indexed(Features):
    """Eval features carrying their own row number as ``feature_index`` (what a prediction is filed under)."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            rows = super().__getitem__(index)
            for i, row in zip(range(*index.indices(len(self))), rows):
                row["feature_index"] = i
            return rows
        index = index + len(self) if index < 0 else int(index)
        return {**super().__getitem__(index), "feature_index": index}


# --------------------------------------------------------------------------- questions


def read_tables(source: str, options: TaskOptions) -> tuple[dict[str, tuple[Any, str]], str | None]:
    """The ``train`` and ``eval`` question tables, each with where it came from (eval held out of train, whole
    articles, when the data has none), cut to ``max_*_samples``, and the note a run must show about the split."""
    from spu_engine.tasks.classification import first

    if is_local(source):
        files = split_files(source)
        named = {"train": files["train"], **({"eval": files["eval"]} if files["eval"] != files["train"] else {})}
        tables = {
            s: (file_table(_questions, path, COLUMNS, {"source": str(path)}), str(path)) for s, path in named.items()
        }
    else:
        tables = {
            s: (_hub_questions(t, f"{source} ({s})"), f"{source} ({s})") for s, t in load_hub_tables(source).items()
        }
    note = None
    if "eval" not in tables:
        tables, note = hold_out(*tables["train"], options.eval_split)
    limits = {"train": options.max_train_samples, "eval": options.max_eval_samples}
    return {s: (first(table, limits[s]), src) for s, (table, src) in tables.items()}, note


def hold_out(table, source: str, eval_split: float | None) -> tuple[dict[str, tuple[Any, str]], str]:
    """Split off the last share of the articles (whole articles, so no context is in both), and say so."""
    fraction = eval_share(eval_split)
    if fraction == 0:
        return {"train": (table, source), "eval": (table, source)}, no_eval_split_note(source, "", eval_split)
    groups: dict[str, None] = {}
    for chunk in column_chunks(table, "group"):
        groups.update(dict.fromkeys(chunk.to_pylist()))
    n_eval = round(len(groups) * fraction)
    if not 0 < n_eval < len(groups):
        raise DataError(
            f"{source}: --eval-split {fraction} leaves no articles for {'eval' if n_eval == 0 else 'training'} ({len(groups)} articles)"
        )
    held = set(list(groups)[len(groups) - n_eval :])
    in_eval = [g in held for chunk in column_chunks(table, "group") for g in chunk.to_pylist()]
    share = f"articles held out, share {fraction}"
    train = select(table, [i for i, e in enumerate(in_eval) if not e], "train " + share)
    evals = select(table, [i for i, e in enumerate(in_eval) if e], "eval " + share)
    note = no_eval_split_note(source, f"the last {n_eval} of {len(groups)} articles are", eval_split)
    return {"train": (train, source), "eval": (evals, f"{source} (held out)")}, note


def _questions(path: str, stamp, version, source: str) -> Iterator[dict[str, str]]:
    """The rows ``file_table`` writes: each record of the file checked and flattened (``stamp`` and ``version``
    key the cache, unread here)."""
    number = 0
    for number, record in enumerate(_records(Path(path), source), 1):
        yield question_row(record, number, source)
    if number == 0:
        raise DataError(f"{source}: no questions")


def _records(path: Path, source: str) -> Iterator[dict[str, Any]]:
    """Flat question records from a nested SQuAD file (data -> paragraphs -> qas) or a flat one."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding=TEXT_ENCODING))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{source}: cannot read ({exc})") from None
        articles = data.get("data") if isinstance(data, dict) else None
        if isinstance(articles, list) and articles and isinstance(articles[0], dict) and "paragraphs" in articles[0]:
            for a, article in enumerate(articles):
                for paragraph in article.get("paragraphs", []):
                    for qa in paragraph.get("qas", []):
                        yield {**qa, "context": paragraph.get("context"), "title": article.get("title", str(a))}
            return
    yield from iter_rows(path)


def _hub_questions(table, source: str):
    """A hub split's questions checked and flattened into the question table's columns, through a cached map."""
    import datasets

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [
            question_row(dict(zip(batch, values)), i + 1, source) for i, values in zip(indices, zip(*batch.values()))
        ]
        return {c: [r[c] for r in rows] for c in COLUMNS}

    kinds = datasets.Features({c: datasets.Value("string") for c in COLUMNS})
    return mapped(table, encode, kinds, fingerprint(table._fingerprint, "qa questions", source), source)


def question_row(r: dict[str, Any], number: int, source: str) -> dict[str, str]:
    """One question as the table holds it, or a DataError naming the question and what is wrong with it."""
    missing = [k for k in ("question", "context", "answers") if r.get(k) is None]
    if missing:
        raise DataError(
            f"{source}: question {number} has no {', '.join(map(repr, missing))}; SQuAD format needs question, context and answers "
            f"(keys found: {', '.join(r) or 'none'})"
        )
    answers = _answers(r["answers"], source, number)
    if not answers:
        raise DataError(
            f"{source}: question {number} ({r.get('id', '?')}) has no answers; SQuAD v2 unanswerable questions are not supported"
        )
    context = str(r["context"])
    for start, text in answers:
        if context[start : start + len(text)] != text:
            raise DataError(
                f"{source}: question {number} ({r.get('id', '?')}): answer_start {start} does not point at the answer {text!r} in the context"
            )
    qid = r.get("id")
    return {
        "id": str(number - 1 if qid is None else qid),
        "question": str(r["question"]).strip(),
        "context": context,
        "answers": json.dumps(answers),
        "group": str(r.get("title") or context),
    }


def _answers(value: Any, source: str, number: int) -> list[tuple[int, str]]:
    """Answers as [{text, answer_start}, ...] (SQuAD JSON) or {text: [...], answer_start: [...]} (hub)."""
    try:
        if isinstance(value, dict):
            return [(int(s), str(t)) for s, t in zip(value["answer_start"], value["text"])]
        return [(int(a["answer_start"]), str(a["text"])) for a in value]
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{source}: question {number}: answers must be a list of {{text, answer_start}}; got {str(value)[:80]}"
        ) from None


# --------------------------------------------------------------------------- windows


def windows(table, tokenizer, options: TaskOptions, src: str, with_offsets: bool):
    """The question table cut into labelled windows (a ``datasets.Dataset`` in the cache): the model's inputs,
    ``start_positions`` / ``end_positions``, the question's row (``example``), whether the window holds its answer
    (``answered``), and with ``with_offsets`` each token's character span (``offset_start`` / ``offset_end``)."""
    import datasets

    listed = getattr(datasets, "List", None) or datasets.Sequence
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tokenizer.model_input_names]
    kinds = {k: listed(datasets.Value("int32" if k == "input_ids" else "int8")) for k in inputs}
    kinds |= {k: datasets.Value("int32") for k in (*TARGETS, "example")} | {"answered": datasets.Value("bool")}
    if with_offsets:
        kinds |= {k: listed(datasets.Value("int32")) for k in ("offset_start", "offset_end")}
    key = [tokenizer_fingerprint(tokenizer), options.max_length, options.doc_stride, with_offsets]
    return mapped(
        table,
        _encoder(tokenizer, options, inputs, with_offsets),
        datasets.Features(kinds),
        fingerprint(table._fingerprint, "qa windows", key),
        src,
    )


def _encoder(tokenizer, options: TaskOptions, inputs: list[str], with_offsets: bool):
    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        _check_room(batch, tokenizer, options)
        try:
            enc = tokenizer(
                batch["question"],
                batch["context"],
                truncation="only_second",
                max_length=options.max_length,
                stride=options.doc_stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
        except Exception as exc:
            raise DataError(
                f"cannot cut questions into windows of --max-length {options.max_length} with "
                f"--doc-stride {options.doc_stride} ({str(exc).splitlines()[0][:200]}); "
                "use a larger --max-length or a smaller --doc-stride"
            ) from None
        out: dict[str, list] = {k: [] for k in (*inputs, *TARGETS, "example", "answered")}
        if with_offsets:
            out |= {"offset_start": [], "offset_end": []}
        for w, j in enumerate(enc["overflow_to_sample_mapping"]):
            sequence_ids = enc.sequence_ids(w)
            offsets = [tuple(o) if sid == 1 else None for o, sid in zip(enc["offset_mapping"][w], sequence_ids)]
            start, end = label(offsets, *json.loads(batch["answers"][j])[0])
            for k in inputs:
                out[k].append(enc[k][w])
            out["start_positions"].append(start)
            out["end_positions"].append(end)
            out["example"].append(indices[j])
            out["answered"].append(start > 0)
            if with_offsets:
                out["offset_start"].append([-1 if o is None else o[0] for o in offsets])
                out["offset_end"].append([-1 if o is None else o[1] for o in offsets])
        return out

    return encode


def _check_room(batch: dict[str, list], tokenizer, options: TaskOptions) -> None:
    """Each window must hold the question and more than ``doc_stride`` context tokens (the tokenizer panics otherwise)."""
    lengths = [len(ids) for ids in tokenizer(batch["question"], add_special_tokens=False)["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    room = options.max_length - lengths[longest] - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= options.doc_stride:
        raise DataError(
            f"question {batch['id'][longest]!r} has {lengths[longest]} tokens, which leaves {max(room, 0)} context tokens in a window of "
            f"--max-length {options.max_length}; that must be more than --doc-stride {options.doc_stride}: raise --max-length or lower --doc-stride"
        )


def label(offsets: list, answer_start: int, text: str) -> tuple[int, int]:
    """Token positions of the answer, or (0, 0) when it is not wholly inside this window."""
    context_tokens = [i for i, o in enumerate(offsets) if o is not None]
    if not context_tokens:
        return 0, 0
    answer_end = answer_start + len(text)
    first, last = context_tokens[0], context_tokens[-1]
    if offsets[first][0] > answer_start or offsets[last][1] < answer_end:
        return 0, 0
    start = max(i for i in context_tokens if offsets[i][0] <= answer_start)
    end = min(i for i in context_tokens if offsets[i][1] >= answer_end)
    return start, end


def unanswered(table, cut) -> list[str]:
    """The ids of the questions none of whose windows holds the answer whole (their windows say 'no answer')."""
    answered = {
        e
        for a, ex in zip(column_chunks(cut, "answered"), column_chunks(cut, "example"))
        for e, yes in zip(ex.to_pylist(), a.to_pylist())
        if yes
    }
    ids = (i for chunk in column_chunks(table, "id") for i in chunk.to_pylist())
    return [qid for row, qid in enumerate(ids) if row not in answered]


def model_features(cut, indexed: bool) -> Features:
    """The windows' columns a batch holds (inputs and labels), as ``Features`` (``Indexed`` for eval)."""
    keep = [c for c in cut.column_names if c not in ("example", "answered", "offset_start", "offset_end")]
    return (Indexed if indexed else Features)(cut.select_columns(keep))
