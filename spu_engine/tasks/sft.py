"""Supervised fine-tuning of a causal LM on prompt / completion data: the loss counts the completion tokens only.

The data's shapes are in ``sft_shapes``, rendering, masking and truncation in ``sft_render``, generation and its
score in ``sft_generate``.  Training and its per-sample loss are the causal LM's (``LMTask``), on labels that are
-100 over the prompt, so selective backprop ranks samples by their completion loss and distillation's KL counts
the completion tokens.  Evaluation: the loss and perplexity over the eval completions' tokens, and with
``generate_eval`` N, greedy generations for the first N eval prompts, scored by exact match of the final answer
where the references have one, and a few shown in the log.
"""

from __future__ import annotations

from typing import Any

import torch

from spu_engine.core.data import DataError, no_rows
from spu_engine.tasks.base import TaskOptions
from spu_engine.tasks.classification import first, held_out_tables
from spu_engine.tasks.lm import LMTask, perplexity
from spu_engine.tasks.sft_data import encoded, read_tables
from spu_engine.tasks.sft_generate import SHOWN, Generation, end_ids, final_answer, generate
from spu_engine.tasks.sft_render import Rendered, chat_template, end_token


class SftTask(LMTask):
    name = "sft"
    model_kind = "lm"
    metric = "perplexity"
    groups_by_length = True

    def __init__(
        self,
        train: list[dict[str, Any]],
        eval: list[dict[str, Any]],
        pad_id: int,
        rendered: Rendered,
        tokenizer,
        options: TaskOptions,
    ) -> None:
        super().__init__(train, eval, pad_id)
        self.prompts = rendered.prompts  # of each eval feature, in order
        self.references = rendered.references
        self.tokenizer = tokenizer
        self.end = end_token(tokenizer)
        self.generate_eval = min(options.generate_eval, len(self.prompts))
        self.max_new_tokens = options.max_new_tokens
        self.scored = any(final_answer(r) is not None for r in self.references[: self.generate_eval])
        self.generations: list[Generation] = []  # the last evaluation's

    @property
    def eval_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        """The LM's, and when generations are scored (the references have final answers) their exact match and
        how many were scored."""
        return (*super().eval_fields, *(("exact_match", "eval_generated") if self.scored else ()))

    @classmethod
    def build(cls, source: str, tokenizer, options: TaskOptions) -> SftTask:
        columns, tables, as_json = read_tables(source, options)
        notes = []
        train_table, train_src = tables["train"]
        if "eval" not in tables:
            tables, held = held_out_tables(train_table, train_src, options)
            notes.append(held)
        template, plain = chat_template(tokenizer)
        if plain:
            notes.append(plain)
        train, evals = (
            encoded(first(tables[s][0], limit), columns, tokenizer, options, template, tables[s][1], as_json)
            for s, limit in (("train", options.max_train_samples), ("eval", options.max_eval_samples))
        )
        eval_src = tables["eval"][1]
        for split, rendered, src in (("train", train, train_src), ("eval", evals, eval_src)):
            said = rendered.note(split, options.max_length)
            if not rendered.total:
                raise DataError(no_rows(src))
            if not rendered.features:
                advice = "; raise --max-length" if rendered.too_long else ""
                raise DataError(f"{src}: no {split} example left: {said}{advice}")
            if said:
                notes.append(said)
        task = cls(train.features, evals.features, tokenizer.pad_token_id, evals, tokenizer, options)
        task.notes = notes
        return task

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict[str, float]:
        """The completion tokens' loss and perplexity; generations for the first ``generate_eval`` eval prompts
        batch by batch, so a stop signal between batches ends them too."""
        total, tokens, seen = 0.0, 0, 0
        self.generations = []
        for batch in batches:
            loss, n = self.summed_loss(model, batch)
            total, tokens = total + loss, tokens + n
            rows = batch["input_ids"].shape[0]
            wanted = range(seen, min(seen + rows, self.generate_eval))
            if len(wanted):
                self.generations += self._generate(model, wanted, batch["input_ids"].device)
            seen += rows
        metrics = perplexity(total, tokens)
        scored = [g.correct for g in self.generations if g.correct is not None]
        if self.scored:
            metrics["exact_match"] = sum(scored) / max(len(scored), 1)  # 0-1, as every SPU score
            metrics["eval_generated"] = len(scored)
        return metrics

    def _generate(self, model, indices: range, device) -> list[Generation]:
        prompts = [self.prompts[i] for i in indices]
        answers = generate(model, prompts, self.pad_id, end_ids(model, self.end), self.max_new_tokens, device)
        out = []
        for i, prompt, answer in zip(indices, prompts, answers):
            reference = self.references[i]
            expected = final_answer(reference)
            text = self.tokenizer.decode(answer, skip_special_tokens=True)
            correct = None if expected is None else final_answer(text) == expected
            out.append(Generation(self.tokenizer.decode(prompt, skip_special_tokens=True), text, reference, correct))
        return out

    def shown(self) -> list[str]:
        """A few of the last evaluation's generations, one line each."""
        return [g.line(i + 1, len(self.generations)) for i, g in enumerate(self.generations[:SHOWN])]
