"""Sequence classification: one text column (SST-2, CoLA) or a sentence pair (MRPC, RTE, QNLI, QQP, MNLI) and a label.

A pair goes to the tokenizer as two texts, so a BERT-style model reads ``[CLS] a [SEP] b [SEP]`` with the
segment ids that tell the halves apart.  Evaluation reports accuracy, and the headline metric when it is
another: GLUE's for data named like a GLUE task (F1 of label 1 for MRPC and QQP, Matthews correlation for
CoLA), or ``--metric``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from spu_engine.core.data import (
    GLUE_REGRESSION,
    DataError,
    data_metric,
    eval_share,
    glue_task,
    hold_out,
    is_local,
    iter_rows,
    load_hub_splits,
    load_hub_tables,
    no_rows,
    pick_column,
    read_rows,
    require_columns,
    split_files,
)
from spu_engine.tasks.arrow_features import Features, encoded, fingerprint, select, tokenizer_fingerprint
from spu_engine.tasks.arrow_rows import label_values, local_table
from spu_engine.tasks.base import Task, TaskOptions
from spu_engine.tasks.infer import LABEL_KEYS
from spu_engine.tasks.labels import check_classes, labelled_rows, labelled_table

TEXT_CANDIDATES = ("sentence", "text", "sentence1", "review", "content", "document")
# sentence pairs by their GLUE column names: MRPC and RTE (hub), QNLI, MRPC (GLUE's own TSV), QQP, MNLI
PAIR_CANDIDATES = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("#1 String", "#2 String"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
)
METRICS = ("accuracy", "f1", "mcc")


@dataclass
class Columns:
    """Where a table keeps its text (one column, or the two of a pair) and its label."""

    text: tuple[str, ...]
    label: str

    @classmethod
    def of(cls, rows: list[dict[str, Any]], options: TaskOptions, source: str) -> Columns:
        """``--text-column`` (``a`` or ``a,b``) and ``--label-column``, else the first known pair or text column and label column."""
        existing = list(rows[0].keys()) if rows else []
        if options.text_column:
            text = tuple(part.strip() for part in options.text_column.split(","))
        else:
            pair = next((p for p in PAIR_CANDIDATES if all(c in existing for c in p)), None)
            text = pair or (pick_column(rows, TEXT_CANDIDATES) or "sentence",)
        label = options.label_column or pick_column(rows, LABEL_KEYS)
        if label is None:
            raise DataError(
                f"{source}: no label column (looked for {', '.join(LABEL_KEYS)}; columns are: {', '.join(existing) or 'none'}); "
                "name it with --label-column (a test file without labels cannot be trained or scored)"
            )
        return cls(text, label)

    def require(self, rows: list[dict[str, Any]], source: str) -> None:
        for column in self.text:
            require_columns(rows, {"--text-column": column}, source)
        require_columns(rows, {"--label-column": self.label}, source)

    def encode(
        self, tokenizer, rows: list[dict[str, Any]], source: str, label_ids: dict[str, int], whose: str, max_length: int
    ) -> list[dict[str, Any]]:
        """Token ids (two texts as the tokenizer's text pair) and the label id of each row; an unknown label is an error naming the row."""
        batch = {c: [r[c] for r in rows] for c in (*self.text, self.label)}
        out = self.encoder(tokenizer, source, label_ids, whose, max_length)(batch, list(range(len(rows))))
        return [dict(zip(out, values)) for values in zip(*out.values())]

    def encoder(self, tokenizer, source: str, label_ids: dict[str, int], whose: str, max_length: int):
        """``encode`` on a batch of columns and its row numbers, as ``datasets``' map calls it."""
        keys = feature_keys(tokenizer)

        def encode(batch: dict[str, list], numbers: list[int]) -> dict[str, list]:
            enc = tokenizer(*[[str(v) for v in batch[c]] for c in self.text], truncation=True, max_length=max_length)
            labels = []
            for number, value in zip(numbers, batch[self.label]):
                key = str(value)
                if key not in label_ids:
                    hidden = " (-1 marks a hidden label, as in GLUE's test splits)" if key == "-1" else ""
                    raise DataError(
                        f"{source}: row {number + 1} has label {value!r}, not among {whose} {list(label_ids)}{hidden}"
                    )
                labels.append(label_ids[key])
            return {**{k: enc[k] for k in keys}, "labels": labels}

        return encode

    def features(self, tokenizer):
        """The features' Arrow types: token ids int32, masks int8 (a quarter of the file int64 would take)."""
        import datasets

        listed = getattr(datasets, "List", None) or datasets.Sequence
        width = {"input_ids": "int32"}
        types = {k: listed(datasets.Value(width.get(k, "int8"))) for k in feature_keys(tokenizer)}
        return datasets.Features({**types, "labels": datasets.Value("int64")})

    def key(self, tokenizer, label_ids: dict[str, int], whose: str, max_length: int) -> list[Any]:
        """What the encoded features depend on besides the rows (their cache file's key)."""
        return [tokenizer_fingerprint(tokenizer), self.text, self.label, label_ids, whose, max_length]


def feature_keys(tokenizer) -> list[str]:
    """The tokenizer's outputs a model reads (BERT's token types; not GPT-2's), in its order."""
    return [k for k in tokenizer.model_input_names if k in FEATURE_KEYS]


FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class ClassificationTask(Task):
    name = "classification"
    model_kind = "classification"
    metric = "accuracy"

    @property
    def eval_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        """Accuracy always, and the headline metric when it is another (F1, Matthews correlation)."""
        return (
            "eval_loss",
            "accuracy",
            *(() if self.metric == "accuracy" else (self.metric,)),
            "top_answer_share",
            "eval_samples",
        )

    @classmethod
    def build(cls, source: str, tokenizer, options: TaskOptions) -> ClassificationTask:
        if glue_task(source) in GLUE_REGRESSION:
            raise DataError(
                f"{source} is GLUE's STS-B: similarity scores (regression), not classes; classification cannot train it"
            )
        columns, tables = read_tables(source, options)
        notes = []
        for split, (table, src) in tables.items():
            table, dropped = labelled_table(table, columns.label, src, options.drop_unlabelled)
            tables[split] = (table, src)
            notes += [dropped] if dropped else []
        train_table, train_src = tables["train"]
        labels = label_values(train_table, columns.label)
        check_classes(labels, len(train_table), columns.label, train_src)
        label_ids = _label_ids(labels)
        if "eval" not in tables:  # after the labels: a label that lands only in the held-out share still has its id
            tables, note = held_out_tables(train_table, train_src, options)
            notes.append(note)

        def encode(split: str, limit: int | None) -> Features:
            table, src = tables[split]
            table = first(table, limit)
            whose, length = "the train labels", options.max_length
            key = fingerprint(table._fingerprint, columns.key(tokenizer, label_ids, whose, length))
            return encoded(
                table, columns.encoder(tokenizer, src, label_ids, whose, length), columns.features(tokenizer), key, src
            )

        task = cls(
            encode("train", options.max_train_samples), encode("eval", options.max_eval_samples), tokenizer.pad_token_id
        )
        task.name_classes(label_ids, options.metric or data_metric(source), train_src)
        task.notes = notes
        return task

    @classmethod
    def scoring(
        cls, rows: list[dict[str, Any]], source: str, tokenizer, options: TaskOptions, label_ids: dict[str, int]
    ) -> ClassificationTask:
        """An eval set only, to score a trained model whose class ids ``label_ids`` names (``spu eval``); ``options.metric`` is the headline."""
        if not rows:
            raise DataError(no_rows(source))
        columns = Columns.of(rows, options, source)
        columns.require(rows, source)
        rows, _ = labelled_rows(rows, columns.label, source, drop=False, hint="score a file whose rows all have one")
        rows = rows[: options.max_eval_samples] if options.max_eval_samples else rows
        task = cls(
            [],
            columns.encode(tokenizer, rows, source, label_ids, "the model's classes", options.max_length),
            tokenizer.pad_token_id,
        )
        task.name_classes(label_ids, options.metric or "accuracy", source)
        return task

    def name_classes(self, label_ids: dict[str, int], metric: str, source: str) -> None:
        """The label of each class id, and the headline metric (F1 is of the positive class, id 1: it needs two classes)."""
        self.label_names = sorted(label_ids, key=label_ids.get)
        self.num_labels = len(self.label_names)
        if metric == "f1" and self.num_labels != 2:
            raise DataError(
                f"--metric f1 is the F1 of the positive class and needs two labels; {source} has {self.num_labels}: {self.label_names}"
            )
        self.metric = metric

    def loss_from(self, outputs, batch):
        return F.cross_entropy(outputs[0].float(), batch["labels"], reduction="none")

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict[str, float]:
        total_loss, predicted, gold = 0.0, [], []
        for batch in batches:
            logits = self.outputs(model, batch)[0].float()
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            predicted.append(logits.argmax(-1).cpu())
            gold.append(batch["labels"].cpu())
        cm = (
            confusion(torch.cat(predicted), torch.cat(gold), self.num_labels)
            if gold
            else torch.zeros(self.num_labels, self.num_labels)
        )
        n, answers = int(cm.sum()), cm.sum(0)
        metrics = {
            "eval_loss": total_loss / max(n, 1),
            "accuracy": float(cm.trace()) / max(n, 1),
            "top_answer_share": float(answers.max()) / max(n, 1),
        }  # 1.0: one answer for everything, a collapsed model (core/collapse.py says so wherever metrics are shown)
        if self.metric == "f1":
            metrics["f1"] = f1_positive(cm)
        elif self.metric == "mcc":
            metrics["mcc"] = matthews(cm)
        return {**metrics, "eval_samples": n, "top_answer": self.label_names[int(answers.argmax())]}


def read_splits(source: str) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """``train`` (and ``eval`` when the data has one) rows of a local file / folder or a hub dataset, each with where it came from."""
    if is_local(source):
        files = split_files(source)
        splits = {"train": (read_rows(files["train"]), str(files["train"]))}
        if files["eval"] != files["train"]:
            splits["eval"] = (read_rows(files["eval"]), str(files["eval"]))
        return splits
    return {s: (rows, f"{source} ({s})") for s, rows in load_hub_splits(source).items()}


def read_tables(source: str, options: TaskOptions) -> tuple[Columns, dict[str, tuple[Any, str]]]:
    """The columns to read and the ``train`` (and ``eval`` when the data has one) split as tables on disk
    (``arrow_rows``), each with where it came from; a local file's columns are found from its first row."""
    heads, named = split_heads(source)
    train_head, train_src = heads["train"]
    if not train_head:
        raise DataError(no_rows(train_src))
    columns = Columns.of(train_head, options, train_src)
    for rows, src in heads.values():
        columns.require(rows, src)
    if is_local(source):
        return columns, {
            s: (local_table(named[s], (*columns.text, columns.label), optional=(columns.label,)), src)
            for s, (_, src) in heads.items()
        }
    return columns, {s: (named[s], src) for s, (_, src) in heads.items()}


def split_heads(source: str) -> tuple[dict[str, tuple[list[dict[str, Any]], str]], dict[str, Any]]:
    """Each split's first row (what its columns are found from) with where it came from, and the split itself: a
    local file's path, a hub dataset's table."""
    if is_local(source):
        files = split_files(source)
        named = {"train": files["train"], **({"eval": files["eval"]} if files["eval"] != files["train"] else {})}
        return {split: (first_rows(path), str(path)) for split, path in named.items()}, named
    hub = load_hub_tables(source)
    return {split: ([table[0]] if len(table) else [], f"{source} ({split})") for split, table in hub.items()}, hub


def held_out_tables(train_table, train_src: str, options: TaskOptions) -> tuple[dict[str, tuple[Any, str]], str]:
    """The train and eval tables when the data has no eval split: a seeded share of the train rows held out
    (``hold_out``), and the note saying so."""
    train_rows, eval_rows, note = hold_out(len(train_table), options.eval_split, options.seed, train_src)
    held = f"held out with seed {options.seed}, share {eval_share(options.eval_split)}"
    return {
        "train": (train_table if train_rows is None else select(train_table, train_rows, "train " + held), train_src),
        "eval": (
            train_table if eval_rows is None else select(train_table, eval_rows, "eval " + held),
            f"{train_src} (held out)",
        ),
    }, note


def first(table, limit: int | None):
    """The table's first ``limit`` rows (all when ``limit`` is 0 or None)."""
    return select(table, range(limit), f"first {limit}") if limit and limit < len(table) else table


def first_rows(path) -> list[dict[str, Any]]:
    """The file's first row (a list of one, or none for an empty file): what its columns are found from."""
    rows = iter_rows(path)
    try:
        return [row for row, _ in zip(rows, range(1))]
    finally:
        rows.close()


def train_label_ids(source: str, options: TaskOptions) -> dict[str, int]:
    """The class id of each label of the training data, as ``build`` numbers them (for runs that did not record their labels)."""
    rows, src = read_splits(source)["train"]
    column = Columns.of(rows, options, src).label
    require_columns(rows, {"--label-column": column}, src)
    return _label_ids(sorted({str(r[column]) for r in rows}))


def _label_ids(labels: list[str]) -> dict[str, int]:
    """Integer labels keep their value (0/1 stay 0/1); other labels are numbered in sorted order."""
    if all(lbl.lstrip("-").isdigit() for lbl in labels):
        values = sorted(int(lbl) for lbl in labels)
        if values == list(range(len(values))):
            return {str(v): v for v in values}
    return {lbl: i for i, lbl in enumerate(labels)}


def confusion(predicted: torch.Tensor, gold: torch.Tensor, classes: int) -> torch.Tensor:
    """Counts [gold class, predicted class], float64."""
    return torch.bincount(gold * classes + predicted, minlength=classes * classes).view(classes, classes).double()


def f1_positive(cm: torch.Tensor) -> float:
    """F1 of class 1 (GLUE's for MRPC and QQP): 2 TP / (predicted positive + actual positive); 0 when both are empty."""
    both = cm[:, 1].sum() + cm[1].sum()
    return float(2 * cm[1, 1] / both) if both > 0 else 0.0


def matthews(cm: torch.Tensor) -> float:
    """Matthews correlation (Gorodkin's K-class form, the binary MCC for two), GLUE's for CoLA; 0 when a side predicts one class only."""
    n, correct = cm.sum(), cm.trace()
    predicted, actual = cm.sum(0), cm.sum(1)
    denominator = ((n * n - predicted @ predicted) * (n * n - actual @ actual)).sqrt()
    return float((correct * n - predicted @ actual) / denominator) if denominator > 0 else 0.0
