"""Conversations into token ids and a label mask: the loss counts the completion tokens only.

Each example is rendered twice with the tokenizer's chat template: the prompt turns with the generation prompt
(``add_generation_prompt=True``: what the model sees when asked to answer), and the whole conversation.  The
prompt's text must be a prefix of the whole one; the rest is the completion.  The two parts are tokenized
separately (no special tokens added: the template writes them), so the prompt's tokens are exactly those a
generation starts from, and the completion's are what follows.  The end-of-sequence token (the tokenizer's
EOS, else its SEP for a BERT-style vocabulary) is appended to a completion that does not already hold it, so
the model learns to stop.

A tokenizer without a chat template gets ``PLAIN_TEMPLATE`` (``### User:`` / ``### Assistant:`` turns separated
by blank lines, a system turn as plain text, the BOS token first when the tokenizer has one); the run says so once.

Truncation keeps the whole prompt and cuts the end of the completion; an example whose prompt alone fills
``max_length`` has no completion token left and is dropped (never trained on with every label masked), as is
one whose completion is empty.  Both counts are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spu_engine.core.data import DataError
from spu_engine.tasks.sft_shapes import SftColumns

PLAIN_TEMPLATE = (
    "{{ bos_token if bos_token is defined and bos_token else '' }}"
    "{% for m in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}"
    "{% else %}### Assistant:\n{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\n\n' }}{% endif %}### Assistant:\n{% endif %}"
)


@dataclass
class Rendered:
    """One split's features (``input_ids``, ``attention_mask``, ``labels``: -100 on the prompt) and, for each,
    its prompt's token ids and reference completion (what a generation is scored against)."""

    features: list[dict[str, list[int]]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    cut: int = 0  # completion's end cut to fit max_length
    too_long: int = 0  # dropped: the prompt alone fills max_length
    empty: int = 0  # dropped: no completion text
    total: int = 0

    def note(self, split: str, max_length: int) -> str | None:
        """What the run says about truncation in this split, None when every example fit."""
        parts = []
        if self.cut:
            parts.append(
                f"{self.cut} of {self.total} {split} examples are longer than --max-length {max_length}: "
                "their completions' ends are cut (prompts kept whole)"
            )
        if self.too_long:
            parts.append(
                f"{self.too_long} of {self.total} {split} examples dropped: the prompt alone fills "
                f"--max-length {max_length} tokens, leaving no completion token to train on"
            )
        if self.empty:
            parts.append(f"{self.empty} of {self.total} {split} examples dropped: their completion is empty")
        return "; ".join(parts) or None


def chat_template(tokenizer) -> tuple[str | None, str | None]:
    """The template to render with (None: the tokenizer's own) and the note a run says once when it is ours."""
    if getattr(tokenizer, "chat_template", None):
        return None, None
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return PLAIN_TEMPLATE, (
        f"the tokenizer of {name} has no chat template: examples are rendered with SPU's plain template "
        "('### User:' and '### Assistant:' turns separated by blank lines; spu_engine/tasks/sft_render.py)"
    )


def end_token(tokenizer) -> int | None:
    """The token that ends a completion: EOS, else SEP (a BERT-style vocabulary); None when it has neither."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


KEPT, CUT, TOO_LONG, EMPTY = 0, 1, 2, 3  # what became of an example (``fit``)


def render(
    rows: list[dict[str, Any]], columns: SftColumns, tokenizer, max_length: int, template: str | None, source: str
) -> Rendered:
    """Features of ``rows`` with the prompt masked; see the module docstring for the rules."""
    out = Rendered(total=len(rows))
    for prompt, completion, status, reference in fitted(
        rows, range(len(rows)), columns, tokenizer, max_length, template, source
    ):
        out.cut += status == CUT
        out.too_long += status == TOO_LONG
        out.empty += status == EMPTY
        if status in (KEPT, CUT):
            out.features.append(feature(prompt, completion))
            out.prompts.append(prompt)
            out.references.append(reference)
    return out


def fitted(rows, numbers, columns: SftColumns, tokenizer, max_length: int, template: str | None, source: str):
    """Each row's prompt and completion token ids, what became of it (``KEPT``, ``CUT``, ``TOO_LONG``, ``EMPTY``)
    and its reference completion; ``numbers``: the rows' numbers in their split, from 0 (for messages)."""
    prompt_texts, completion_texts, references = [], [], []
    for number, row in zip(numbers, rows):
        where = f"{source}: row {number + 1}"
        turns, completion = columns.conversation(row, where)
        prompt = _apply(tokenizer, turns, template, True, where)
        whole = _apply(tokenizer, [*turns, {"role": "assistant", "content": completion}], template, False, where)
        if not whole.startswith(prompt):
            raise DataError(
                f"{where}: the chat template does not render the prompt (with its generation prompt) as the start of "
                "the whole conversation, so the completion cannot be told apart; use a template that does, or "
                "--task lm on the rendered text"
            )
        prompt_texts.append(prompt)
        completion_texts.append(whole[len(prompt) :] if completion.strip() else "")
        references.append(completion)
    if not prompt_texts:
        return []
    end = end_token(tokenizer)
    return [
        (prompt, *fit(prompt, completion, text, end, max_length), reference)
        for prompt, completion, text, reference in zip(
            _tokens(tokenizer, prompt_texts), _tokens(tokenizer, completion_texts), completion_texts, references
        )
    ]


def fit(prompt: list[int], completion: list[int], text: str, end: int | None, max_length: int):
    """The completion's token ids (ended, cut to fit) and what became of the example."""
    if not text:
        return completion, EMPTY
    if end is not None and end not in completion:
        completion = [*completion, end]
    if len(prompt) >= max_length:
        return completion, TOO_LONG
    if len(prompt) + len(completion) > max_length:
        return completion[: max_length - len(prompt)], CUT
    return completion, KEPT


def feature(prompt: list[int], completion: list[int]) -> dict[str, list[int]]:
    ids = prompt + completion
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + completion}


def _apply(tokenizer, turns: list[dict[str, str]], template: str | None, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )
    except Exception as exc:  # a template raises on what it does not support (a system turn, two user turns in a row)
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: the chat template cannot render this conversation: {text}") from None


def _tokens(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added, no warning for a text longer than the model's maximum."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # long examples are cut above, and counted
    try:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
