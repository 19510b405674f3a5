"""Causal language modelling (WikiText-2 raw and any plain text), scored by perplexity.

The text is tokenized line by line without special tokens, concatenated, and cut
into blocks of ``max_length`` tokens (the remainder is dropped, as in Hugging
Face's run_clm); each block is its own label sequence.  Perplexity is
``exp`` of the mean next-token loss over every predicted token of the eval text.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spu_engine.core.data import DataError, eval_share, no_eval_split_note
from spu_engine.tasks.base import Task, TaskOptions, kl_rows
from spu_engine.tasks.infer import config_is_encoder_only
from spu_engine.tasks.lm_data import blocks, flat_ids, text_tables, token_table

TEXT_SUFFIXES = (".raw", ".txt")
LOGITS_BUDGET = 2**26  # logits per eval forward (256 MB in fp32): a big eval batch of long blocks is cut into rows


class LMTask(Task):
    name = "lm"
    model_kind = "lm"
    metric = "perplexity"
    eval_fields = ("eval_loss", "perplexity", "eval_tokens")

    @classmethod
    def build(cls, source: str, tokenizer, options: TaskOptions) -> LMTask:
        tables = text_tables(source, options.text_column, TEXT_SUFFIXES)
        block = options.max_length
        tokens = {s: token_table(*tables[s], tokenizer) for s in ("train", "eval")}
        ids = {s: flat_ids(t) for s, t in tokens.items()}
        spans = {s: (0, len(i)) for s, i in ids.items()}
        notes = []
        if (
            tables["train"] is tables["eval"]
        ):  # no eval split: the tail of the text, so no eval token is inside a training block
            share = eval_share(options.eval_split)
            n = len(ids["train"])
            cut = int(n * (1 - share))
            notes.append(
                no_eval_split_note(
                    source, f"the last {share:.0%} of the text ({n - cut:,} tokens) is", options.eval_split
                )
            )
            if share:
                spans = {"train": (0, cut), "eval": (cut, n)}
        train, evals = (
            blocks(tokens[s], ids[s], *spans[s], block, limit, s, tables[s][1])
            for s, limit in (("train", options.max_train_samples), ("eval", options.max_eval_samples))
        )
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
