"""Causal language modelling (WikiText-2 raw and any plain text), scored by perplexity.

The text is tokenized line by line without special tokens, concatenated, and cut
into blocks of ``max_length`` tokens (the remainder is dropped, as in Hugging
Face's run_clm); each block is its own label sequence.  Perplexity is
``exp`` of the mean next-token loss over every predicted token of the eval text.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from spu_engine.core.data import (
    TEXT_ENCODING,
    DataError,
    eval_share,
    is_local,
    load_hub_splits,
    no_eval_split_note,
    pick_column,
    read_rows,
    require_columns,
    split_files,
)
from spu_engine.tasks.base import Task, TaskOptions, kl_rows
from spu_engine.tasks.infer import config_is_encoder_only

TEXT_SUFFIXES = (".raw", ".txt")
TEXT_CANDIDATES = ("text", "content", "sentence", "document")
LOGITS_BUDGET = 2**26  # logits per eval forward (256 MB in fp32): a big eval batch of long blocks is cut into rows


class LMTask(Task):
    name = "lm"
    model_kind = "lm"
    metric = "perplexity"
    eval_fields = ("eval_loss", "perplexity", "eval_tokens")

    @classmethod
    def build(cls, source: str, tokenizer, options: TaskOptions) -> LMTask:
        train_text, eval_text, same = load_text(source, options.text_column)
        block = options.max_length
        train_ids = token_ids(train_text, tokenizer)
        notes = []
        if same:  # no eval split: the tail of the text, so no eval token is inside a training block
            share = eval_share(options.eval_split)
            cut = int(len(train_ids) * (1 - share))
            notes.append(
                no_eval_split_note(
                    source, f"the last {share:.0%} of the text ({len(train_ids) - cut:,} tokens) is", options.eval_split
                )
            )
            train_ids, eval_ids = (train_ids[:cut], train_ids[cut:]) if share else (train_ids, train_ids)
        else:
            eval_ids = token_ids(eval_text, tokenizer)
        train = blocks(train_ids, block, "train", source)[: options.max_train_samples or None]
        evals = blocks(eval_ids, block, "eval", source)[: options.max_eval_samples or None]
        task = cls(train, evals, tokenizer.pad_token_id)
        task.notes = notes
        return task

    def check_fits(self, model) -> None:
        """An encoder trained as a causal LM sees the tokens it predicts and learns nothing usable (MiniLM ran to
        perplexity 15,825 without a word): refused before training, naming what to use instead."""
        super().check_fits(model)
        config = getattr(model, "config", None)
        if config is not None and config_is_encoder_only(config):
            raise DataError(
                f"--task {self.name}: the model is a {config.model_type}, an encoder-only (bidirectional) model, and "
                f"{self.name} trains a causal (left-to-right) language model: an encoder sees the next token it is "
                "asked to predict, so it cannot learn the task. Use a decoder-only model (GPT-2, Llama, Qwen, ...) "
                f"for {self.name}, or --task classification or qa with this model"
            )

    def loss_from(self, outputs, batch):
        token_loss, mask = self._token_loss(outputs[0], batch)
        return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)

    def per_sample_kl(self, student, teacher, batch, temperature):
        """Per token over the vocabulary, averaged over the tokens that have a label (as the loss is)."""
        mask = self._next_labels(batch) != -100
        kl = kl_rows(student[0], teacher[0], temperature) * mask
        return kl.sum(1) / mask.sum(1).clamp(min=1)

    @staticmethod
    def _next_labels(batch) -> torch.Tensor:
        """Each position's label is the next token: the labels move left instead of the logits, so the
        [B, T, vocab] logits are never copied; the last position has none."""
        return F.pad(batch["labels"][:, 1:], (0, 1), value=-100)

    def _token_loss(self, logits, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token loss [B, T] and the mask of positions that have a label (never the last one)."""
        labels = self._next_labels(batch)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        return loss, (labels != -100).to(loss.dtype)

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict[str, float]:
        total, tokens = 0.0, 0
        for batch in batches:
            loss, n = self.summed_loss(model, batch)
            total, tokens = total + loss, tokens + n
        return perplexity(total, tokens)

    def summed_loss(self, model, batch) -> tuple[float, int]:
        """Summed next-token loss of ``batch`` and the number of tokens it counts, a few rows per forward."""
        total, tokens = 0.0, 0
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 50_000
        rows = max(1, LOGITS_BUDGET // (batch["input_ids"].shape[1] * vocab))
        for i in range(0, batch["input_ids"].shape[0], rows):
            rows_batch = {k: v[i : i + rows] for k, v in batch.items()}
            loss, mask = self._token_loss(self.outputs(model, rows_batch)[0], rows_batch)
            total += float((loss * mask).sum())
            tokens += int(mask.sum())
        return total, tokens


def perplexity(total: float, tokens: int) -> dict[str, float]:
    """The eval fields of a summed token loss: the mean, its exp and the token count."""
    mean = total / max(tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf, "eval_tokens": tokens}


def load_text(source: str, text_column: str | None = None) -> tuple[str, str, bool]:
    """Train text, eval text, and whether both come from the same single source."""
    if not is_local(source):
        hub = load_hub_splits(source)
        train = _join(hub["train"], text_column, f"{source} (train)")
        if "eval" not in hub:
            return train, train, True
        return train, _join(hub["eval"], text_column, f"{source} (eval)"), False
    files = split_files(source)
    texts = {}
    for split, path in files.items():
        if path.suffix.lower() in TEXT_SUFFIXES:
            try:
                texts[split] = path.read_text(encoding=TEXT_ENCODING)
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: cannot read ({exc})") from None
        else:
            texts[split] = _join(read_rows(path), text_column, str(path))
    return texts["train"], texts["eval"], files["train"] == files["eval"]


def _join(rows: list[dict[str, Any]], text_column: str | None, source: str) -> str:
    """One text from a table: rows that keep their newline (hub WikiText) are joined as they are."""
    column = text_column or pick_column(rows, TEXT_CANDIDATES) or "text"
    require_columns(rows, {"--text-column": column}, source)
    lines = [str(r[column] or "") for r in rows]
    return "".join(lines) if all(not line or line.endswith("\n") for line in lines) else "\n".join(lines)


def token_ids(text: str, tokenizer) -> list[int]:
    """Token ids of the whole text, tokenized a line at a time (no special tokens, no length warnings)."""
    from transformers.utils import logging as hf_logging

    lines = text.splitlines(keepends=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a long line exceeds model_max_length; blocks are cut below
    try:
        encoded = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
    finally:
        hf_logging.set_verbosity(verbosity)
    return [i for ids in encoded for i in ids]


def blocks(ids: list[int], size: int, split: str, source: str) -> list[dict[str, list[int]]]:
    n = len(ids) // size
    if n == 0:
        raise DataError(
            f"{source}: the {split} text has {len(ids)} tokens, fewer than one block of --max-length {size}"
        )
    return [{"input_ids": ids[i * size : (i + 1) * size], "labels": ids[i * size : (i + 1) * size]} for i in range(n)]
