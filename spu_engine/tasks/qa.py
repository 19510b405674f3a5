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
import json
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path
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
    read_rows,
    split_files,
)
from spu_engine.tasks.base import Task, TaskOptions, model_inputs

MAX_ANSWER_TOKENS = 30
N_BEST = 20  # start and end candidates per window


@dataclass
class Example:
    id: str
    question: str
    context: str
    answers: list[tuple[int, str]]  # (character offset into context, text)
    group: str  # article title (or context): a held-out split never shares a context with training


class QATask(Task):
    name = "qa"
    model_kind = "qa"
    metric = "f1"
    eval_fields = ("eval_loss", "exact_match", "f1", "eval_samples")

    def __init__(self, train, eval, pad_id, eval_examples: list[Example], eval_windows: list[tuple[int, list]]) -> None:
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
        train, evals, note = load_squad(source, options.eval_split)
        train = train[: options.max_train_samples] if options.max_train_samples else train
        evals = evals[: options.max_eval_samples] if options.max_eval_samples else evals
        train_feats, _, train_missing = _windows(train, tokenizer, options)
        eval_feats, eval_windows, eval_missing = _windows(evals, tokenizer, options)
        for i, feat in enumerate(eval_feats):
            feat["feature_index"] = i
        task = cls(train_feats, eval_feats, tokenizer.pad_token_id, evals, eval_windows)
        task.out_of_window = {"train": train_missing, "eval": eval_missing}
        task.notes = [note] if note else []
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


# --------------------------------------------------------------------------- data


def load_squad(source: str, eval_split: float | None = None) -> tuple[list[Example], list[Example], str | None]:
    """Train and eval examples from a hub name, a SQuAD JSON file, or a folder with train/dev files, and the
    note a run must show when there was no eval split (part of train is held out, see ``hold_out``)."""
    if not is_local(source):
        hub = load_hub_splits(source)
        train = _examples(hub["train"], f"{source} (train)")
        if "eval" in hub:
            return train, _examples(hub["eval"], f"{source} (eval)"), None
        return hold_out(train, eval_split, f"{source} (train)")
    files = split_files(source)
    train = _examples(_records(files["train"]), str(files["train"]))
    if files["eval"] != files["train"]:
        return train, _examples(_records(files["eval"]), str(files["eval"])), None
    return hold_out(train, eval_split, str(files["train"]))


def hold_out(
    examples: list[Example], eval_split: float | None, source: str
) -> tuple[list[Example], list[Example], str]:
    """Split off the last share of the articles (whole articles, so no context is in both), and say so."""
    fraction = eval_share(eval_split)
    if fraction == 0:
        return examples, examples, no_eval_split_note(source, "", eval_split)
    groups = list(dict.fromkeys(e.group for e in examples))
    n_eval = round(len(groups) * fraction)
    if not 0 < n_eval < len(groups):
        raise DataError(
            f"{source}: --eval-split {fraction} leaves no articles for {'eval' if n_eval == 0 else 'training'} ({len(groups)} articles)"
        )
    held = set(groups[len(groups) - n_eval :])
    note = no_eval_split_note(source, f"the last {n_eval} of {len(groups)} articles are", eval_split)
    return [e for e in examples if e.group not in held], [e for e in examples if e.group in held], note


def _records(path: Path) -> list[dict[str, Any]]:
    """Flat question records from a nested SQuAD file (data -> paragraphs -> qas) or a flat one."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding=TEXT_ENCODING))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
        articles = data.get("data") if isinstance(data, dict) else None
        if isinstance(articles, list) and articles and isinstance(articles[0], dict) and "paragraphs" in articles[0]:
            return [
                {**qa, "context": paragraph.get("context"), "title": article.get("title", str(a))}
                for a, article in enumerate(articles)
                for paragraph in article.get("paragraphs", [])
                for qa in paragraph.get("qas", [])
            ]
    return read_rows(path)


def _examples(records: list[dict[str, Any]], source: str) -> list[Example]:
    if not records:
        raise DataError(f"{source}: no questions")
    out = []
    for i, r in enumerate(records):
        missing = [k for k in ("question", "context", "answers") if r.get(k) is None]
        if missing:
            raise DataError(
                f"{source}: question {i + 1} has no {', '.join(map(repr, missing))}; SQuAD format needs question, context and answers "
                f"(keys found: {', '.join(r) or 'none'})"
            )
        answers = _answers(r["answers"], source, i)
        if not answers:
            raise DataError(
                f"{source}: question {i + 1} ({r.get('id', '?')}) has no answers; SQuAD v2 unanswerable questions are not supported"
            )
        context = str(r["context"])
        for start, text in answers:
            if context[start : start + len(text)] != text:
                raise DataError(
                    f"{source}: question {i + 1} ({r.get('id', '?')}): answer_start {start} does not point at the answer {text!r} in the context"
                )
        out.append(
            Example(str(r.get("id", i)), str(r["question"]).strip(), context, answers, str(r.get("title") or context))
        )
    return out


def _answers(value: Any, source: str, i: int) -> list[tuple[int, str]]:
    """Answers as [{text, answer_start}, ...] (SQuAD JSON) or {text: [...], answer_start: [...]} (hub)."""
    try:
        if isinstance(value, dict):
            return [(int(s), str(t)) for s, t in zip(value["answer_start"], value["text"])]
        return [(int(a["answer_start"]), str(a["text"])) for a in value]
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{source}: question {i + 1}: answers must be a list of {{text, answer_start}}; got {str(value)[:80]}"
        ) from None


def _windows(
    examples: list[Example], tokenizer, options: TaskOptions
) -> tuple[list[dict[str, Any]], list[tuple[int, list]], list[str]]:
    """Tokenized windows with start/end labels, their context offsets, and the ids of unanswerable-in-window questions."""
    _check_room(examples, tokenizer, options)
    try:
        enc = tokenizer(
            [e.question for e in examples],
            [e.context for e in examples],
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
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features, windows = [], []
    answered: set[int] = set()
    for w, example_index in enumerate(enc["overflow_to_sample_mapping"]):
        example = examples[example_index]
        sequence_ids = enc.sequence_ids(w)
        offsets = [tuple(o) if sid == 1 else None for o, sid in zip(enc["offset_mapping"][w], sequence_ids)]
        start, end = _label(offsets, *example.answers[0])
        if start:
            answered.add(example_index)
        features.append({**{k: enc[k][w] for k in keys}, "start_positions": start, "end_positions": end})
        windows.append((example_index, offsets))
    missing = [e.id for i, e in enumerate(examples) if i not in answered]
    return features, windows, missing


def _check_room(examples: list[Example], tokenizer, options: TaskOptions) -> None:
    """Each window must hold the question and more than ``doc_stride`` context tokens (the tokenizer panics otherwise)."""
    lengths = [len(ids) for ids in tokenizer([e.question for e in examples], add_special_tokens=False)["input_ids"]]
    longest = max(range(len(examples)), key=lengths.__getitem__)
    room = options.max_length - lengths[longest] - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= options.doc_stride:
        raise DataError(
            f"question {examples[longest].id!r} has {lengths[longest]} tokens, which leaves {max(room, 0)} context tokens in a window of "
            f"--max-length {options.max_length}; that must be more than --doc-stride {options.doc_stride}: raise --max-length or lower --doc-stride"
        )


def _label(offsets: list, answer_start: int, text: str) -> tuple[int, int]:
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
