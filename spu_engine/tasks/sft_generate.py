"""What a fine-tuned model now answers: greedy generations for eval prompts, scored by exact match of the final answer.

The final answer is what follows the last ``####`` of a text (GSM8K's ``#### 72``): a number loses its commas
(``1,000`` -> ``1000``), a ``$`` and a trailing period; anything else is the rest of that line.  A decoded
WordPiece text spells the marker ``# # # #`` and a number ``1, 000``; both read the same.  A reference without
a final answer is not scored (its generation is still shown); a generation without one scores 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

MARKER = re.compile(r"#[ \t]*#[ \t]*#[ \t]*#")
NUMBER = re.compile(r"\$?\s*(-?\s*\d[\d,]*(?:\.\d+)?)")
SHOWN = 3  # generations an evaluation shows in the log
TAIL = 120  # characters of a prompt shown


def final_answer(text: str) -> str | None:
    """The final answer after the last ``####`` (normalised as the module docstring says), None without one."""
    found = list(MARKER.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :].split("\n", 1)[0].strip().replace(", ", ",")
    number = NUMBER.match(rest)
    if number:
        return number.group(1).replace(",", "").replace(" ", "").rstrip(".")
    return rest.rstrip(".").strip() or None


@dataclass
class Generation:
    prompt: str  # the prompt as decoded
    answer: str  # the generated completion, special tokens left out
    reference: str
    correct: bool | None  # None: the reference has no final answer to score

    def line(self, index: int, total: int) -> str:
        """One readable log line: the prompt's tail, the answer, the reference's final answer and the verdict."""
        prompt = " ".join(self.prompt.split())
        prompt = prompt if len(prompt) <= TAIL else "…" + prompt[-TAIL:]
        answer = " ".join(self.answer.split()) or "(nothing)"
        expected = final_answer(self.reference)
        verdict = "" if self.correct is None else f" [{'right' if self.correct else 'wrong'}: expected {expected}]"
        return f"generation {index} of {total}: {prompt} -> {answer}{verdict}"


def generate(
    model, prompts: list[list[int]], pad_id: int, end_ids: list[int], max_new_tokens: int, device
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (left-padded into one batch), at most ``max_new_tokens`` each and never
    past the model's positions; each ends at its first end token (left out)."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    width = max(len(p) for p in prompts)
    limit = _positions(model)
    new = min(max_new_tokens, limit - width) if limit is not None else max_new_tokens
    if new <= 0:
        return [[] for _ in prompts]
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = GenerationConfig(  # fresh: the model's own may sample (temperature, top_p)
        max_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=end_ids or None
    )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    continuations = []
    for row in out[:, width:].tolist():
        stop = next((i for i, token in enumerate(row) if token in end_ids), len(row))
        continuations.append(row[:stop])
    return continuations


def end_ids(model, end: int | None) -> list[int]:
    """The tokens that end a generation: the one completions were trained to end with, and the model's own EOS."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = own if isinstance(own, list) else ([own] if own is not None else [])
    return list(dict.fromkeys([*([end] if end is not None else []), *ids]))


def _positions(model) -> int | None:
    config = getattr(model, "config", None)
    return next(
        (
            getattr(config, k)
            for k in ("n_positions", "max_position_embeddings")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )
