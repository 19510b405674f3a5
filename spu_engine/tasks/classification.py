"""Sequence classification (SST-2 and any text/label table)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data import DataError, hold_out_rows, is_local, load_hub_splits, pick_column, read_rows, require_columns, split_files
from .base import Task, TaskOptions

TEXT_CANDIDATES = ("sentence", "text", "sentence1", "review", "content", "document")
LABEL_CANDIDATES = ("label", "labels", "target", "class")


class ClassificationTask(Task):
    name = "classification"
    model_kind = "classification"
    metric = "accuracy"
    eval_fields = ("eval_loss", "accuracy", "eval_samples")

    @classmethod
    def build(cls, source: str, tokenizer, options: TaskOptions) -> "ClassificationTask":
        if is_local(source):
            files = split_files(source)
            splits = {"train": (read_rows(files["train"]), str(files["train"]))}
            if files["eval"] != files["train"]:
                splits["eval"] = (read_rows(files["eval"]), str(files["eval"]))
        else:
            hub = load_hub_splits(source)
            splits = {s: (rows, f"{source} ({s})") for s, rows in hub.items()}
        train_rows, train_src = splits["train"]
        if not train_rows:
            raise DataError(f"{train_src}: no rows")
        text_col = options.text_column or pick_column(train_rows, TEXT_CANDIDATES) or "sentence"
        label_col = options.label_column or pick_column(train_rows, LABEL_CANDIDATES) or "label"
        wanted = {"--text-column": text_col, "--label-column": label_col}
        for rows, src in splits.values():
            require_columns(rows, wanted, src)
        labels = sorted({str(r[label_col]) for r in train_rows})
        label_ids = _label_ids(labels)
        note = None
        if "eval" not in splits:  # after the labels: a label that lands only in the held-out share still has its id
            train_rows, eval_rows, note = hold_out_rows(train_rows, options.eval_split, options.seed, train_src)
            splits = {"train": (train_rows, train_src), "eval": (eval_rows, f"{train_src} (held out)")}

        def encode(rows: list[dict[str, Any]], src: str, limit: int | None) -> list[dict[str, Any]]:
            rows = rows[:limit] if limit else rows
            texts = [str(r[text_col]) for r in rows]
            enc = tokenizer(texts, truncation=True, max_length=options.max_length)
            out = []
            for i, r in enumerate(rows):
                key = str(r[label_col])
                if key not in label_ids:
                    raise DataError(f"{src}: row {i + 1} has label {r[label_col]!r}, not among the train labels {labels}")
                feat = {k: enc[k][i] for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")}
                feat["labels"] = label_ids[key]
                out.append(feat)
            return out

        task = cls(
            encode(train_rows, train_src, options.max_train_samples),
            encode(splits["eval"][0], splits["eval"][1], options.max_eval_samples),
            tokenizer.pad_token_id,
        )
        task.num_labels = len(labels)
        task.label_names = labels
        task.notes = [note] if note else []
        return task

    def outputs(self, model, batch):
        return (model(**{k: v for k, v in batch.items() if k != "labels"}).logits,)

    def loss_from(self, outputs, batch):
        return F.cross_entropy(outputs[0].float(), batch["labels"], reduction="none")

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict[str, float]:
        total_loss, correct, n = 0.0, 0, 0
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            n += batch["labels"].numel()
        return {"eval_loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "eval_samples": n}


def _label_ids(labels: list[str]) -> dict[str, int]:
    """Integer labels keep their value (0/1 stay 0/1); other labels are numbered in sorted order."""
    if all(lbl.lstrip("-").isdigit() for lbl in labels):
        values = sorted(int(lbl) for lbl in labels)
        if values == list(range(len(values))):
            return {str(v): v for v in values}
    return {lbl: i for i, lbl in enumerate(labels)}
