"""Extractive question answering on SQuAD v1.1-format data, scored by exact match and F1.

A question and its context become one or more windows of ``max_length`` tokens:
only the context is truncated, and consecutive windows of a long context share
``doc_stride`` tokens.  A window is labelled with the token span of the first
reference answer, or with position 0 (the CLS token) when the answer is not
inside it.  At evaluation every window of a question proposes spans; the one
with the highest start + end logit wins, and is scored against every
reference answer with the official SQuAD normalisation.  Exact match and F1 are fractions (0-1), the scale of every
SPU score; SQuAD's own script and papers write them as percentages (88.5 there is 0.885 here).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

import spu_engine.tasks.qa_data as qa_data
from spu_engine.core.data import DataError
from spu_engine.tasks.base import Task, TaskOptions, model_inputs

MAX_ANSWER_TOKENS = 30
N_BEST = 20  # start and end candidates per window


class QATask(Task):
    name = "qa"
    model_kind = "qa"
    metric = "f1"
    eval_fields = ("eval_loss", "exact_match", "f1", "eval_samples")

    def __init__(self, train, eval, pad_id, eval_examples: Sequence[qa_data.Example], eval_windows: Sequence) -> None:
        super().__init__(train, eval, pad_id)
        self.eval_examples = eval_examples
        self.eval_windows = eval_windows  # feature index -> (example index, per-token context offsets or None)
        self.out_of_window: dict[str, list[str]] = {"train": [], "eval": []}

    @classmethod
    def build(cls, source: str, tokenizer, options: TaskOptions) -> QATask:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                "the qa task needs a fast tokenizer (for offset mappings); this model ships only a slow one"
            )
        stride = options.doc_stride or options.max_length // 3
        if not 0 < stride < options.max_length:
            raise DataError(
                f"--doc-stride must be between 1 and --max-length - 1 ({options.max_length - 1}); got {stride}"
            )
        options = replace(options, doc_stride=stride)
        tables, note = qa_data.read_tables(source, options)
        (train, train_src), (evals, eval_src) = tables["train"], tables["eval"]
        train_cut = qa_data.windows(train, tokenizer, options, train_src, with_offsets=False)
        eval_cut = qa_data.windows(evals, tokenizer, options, eval_src, with_offsets=True)
        task = cls(
            qa_data.model_features(train_cut, indexed=False),
            qa_data.model_features(eval_cut, indexed=True),
            tokenizer.pad_token_id,
            qa_data.questions(evals),
            qa_data.windows_seen(eval_cut.select_columns(["example", "offset_start", "offset_end"])),
        )
        task.out_of_window = {
            "train": qa_data.unanswered(train, train_cut),
            "eval": qa_data.unanswered(evals, eval_cut),
        }
        task.notes = [note] if note else []
        task.notes += [
            _unanswered_note(task.out_of_window[s], len(t), s, options) for s, t in (("train", train), ("eval", evals))
        ]
        task.notes = [n for n in task.notes if n]
        return task

    def outputs(self, model, batch):
        out = model(**model_inputs(model, batch))
        return out.start_logits, out.end_logits

    def loss_from(self, outputs, batch):
        start = F.cross_entropy(outputs[0].float(), batch["start_positions"], reduction="none")
        end = F.cross_entropy(outputs[1].float(), batch["end_positions"], reduction="none")
        return (start + end) / 2

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict[str, float]:
        starts: dict[int, torch.Tensor] = {}
        ends: dict[int, torch.Tensor] = {}
        total_loss, n_windows = 0.0, 0
        for batch in batches:
            out = model(**model_inputs(model, batch))
            s, e = out.start_logits.float(), out.end_logits.float()
            loss = (
                F.cross_entropy(s, batch["start_positions"], reduction="sum")
                + F.cross_entropy(e, batch["end_positions"], reduction="sum")
            ) / 2
            total_loss += loss.item()
            n_windows += s.shape[0]
            for row, index in enumerate(batch["feature_index"].tolist()):
                starts[index], ends[index] = s[row].cpu(), e[row].cpu()
        predictions = self.predict(starts, ends)
        em = f1 = 0.0
        for i, example in enumerate(self.eval_examples):
            references = [text for _, text in example.answers]
            em += max(exact_match(predictions.get(i, ""), ref) for ref in references)
            f1 += max(f1_score(predictions.get(i, ""), ref) for ref in references)
        n = max(len(self.eval_examples), 1)
        return {
            "eval_loss": total_loss / max(n_windows, 1),
            "exact_match": em / n,  # 0-1, as every SPU score (SQuAD's evaluate script writes 0-100)
            "f1": f1 / n,
            "eval_samples": len(self.eval_examples),
        }

    def predict(self, starts: dict[int, torch.Tensor], ends: dict[int, torch.Tensor]) -> dict[int, str]:
        """Example index -> answer text: the best-scoring valid span over all windows of the question."""
        best: dict[int, tuple[float, str]] = {}
        for index, start_logits in starts.items():
            example_index, offsets = self.eval_windows[index]
            context = self.eval_examples[example_index].context
            n = len(offsets)
            start_logits, end_logits = start_logits[:n], ends[index][:n]
            top_starts = torch.topk(start_logits, min(N_BEST, n)).indices.tolist()
            top_ends = torch.topk(end_logits, min(N_BEST, n)).indices.tolist()
            for s in top_starts:
                for e in top_ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if example_index not in best or score > best[example_index][0]:
                        best[example_index] = (score, context[offsets[s][0] : offsets[e][1]])
        return {i: text for i, (_, text) in best.items()}


def _unanswered_note(ids: list[str], questions: int, split: str, options: TaskOptions) -> str | None:
    """What a run says when some questions' answers fit in none of their windows (those train as 'no answer')."""
    if not ids:
        return None
    shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
    return (
        f"{len(ids)} of {questions} {split} questions ({shown}) have an answer that no window of --max-length "
        f"{options.max_length} tokens holds whole: their windows are labelled 'no answer'; a larger --max-length keeps them"
    )


# --------------------------------------------------------------------------- the official SQuAD v1.1 metric


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (as SQuAD's evaluate-v1.1.py)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)
