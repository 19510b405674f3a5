"""The shapes supervised fine-tuning data comes in, and each row as a conversation: the prompt turns and the
completion (the assistant's answer the loss counts).

- ``messages``: a list of ``{role, content}``; the completion is the **last** turn, which must be the assistant's,
  and every turn before it (earlier assistant turns included) is the prompt.  Only the last answer is trained on,
  so the prompt / completion split is the same for every shape; to train on every assistant turn of a
  conversation, give one row per turn.
- ``prompt`` / ``completion``: strings, or (TRL's conversational form) lists of ``{role, content}`` messages.
- Alpaca's ``instruction`` / ``input`` / ``output``: the user turn is the instruction, then the input after a
  blank line when there is one.
- ``question`` / ``answer`` (GSM8K), only without ``context``: with one it is extractive QA's data.

``--prompt-column`` / ``--completion-column`` name the columns of a table of another shape (or override one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spu_engine.core.data import DataError, require_columns

# (shape, prompt column, completion column), in the order a table's columns are matched
SHAPES = (
    ("messages", "messages", None),
    ("prompt/completion", "prompt", "completion"),
    ("alpaca", "instruction", "output"),
    ("question/answer", "question", "answer"),
)
QA_ONLY = "context"  # a question/answer table with a context is extractive QA's, never sft's
ROLES = ("system", "user", "assistant")


def sft_shape(columns: set[str] | list[str]) -> str | None:
    """The SFT shape a table with ``columns`` has, or None."""
    keys = set(columns)
    for shape, prompt, completion in SHAPES:
        if prompt in keys and (completion is None or completion in keys):
            if shape == "question/answer" and QA_ONLY in keys:
                return None
            return shape
    return None


@dataclass(frozen=True)
class SftColumns:
    """Where a table keeps the prompt and the completion; ``completion`` None: the prompt column holds whole
    conversations (``messages``); ``input``: Alpaca's optional input column."""

    prompt: str
    completion: str | None
    input: str | None = None

    @classmethod
    def of(cls, rows: list[dict[str, Any]], prompt: str | None, completion: str | None, source: str) -> SftColumns:
        existing = list(rows[0]) if rows else []
        shape = sft_shape(existing)
        if shape is None and (prompt is None or completion is None):
            found = ", ".join(map(str, existing)) or "none"
            raise DataError(
                f"{source}: not supervised fine-tuning data: it needs messages, prompt/completion, "
                f"instruction/output (Alpaca) or question/answer columns (columns: {found}); "
                "name them with --prompt-column and --completion-column"
            )
        _, default_prompt, default_completion = next(s for s in SHAPES if s[0] == shape) if shape else (None,) * 3
        columns = cls(
            prompt or default_prompt,
            completion or default_completion,
            "input" if shape == "alpaca" and prompt is None and "input" in existing else None,
        )
        if columns.completion is None and prompt is not None and prompt != "messages":
            raise DataError(
                f"{source}: --prompt-column {prompt} needs --completion-column too (the table's shape is messages)"
            )
        require_columns(rows, columns.wanted(), source)
        return columns

    def wanted(self) -> dict[str, str]:
        """The columns a table must have, by the option that names them."""
        return {"--prompt-column": self.prompt, **({"--completion-column": self.completion} if self.completion else {})}

    def conversation(self, row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], str]:
        """The prompt turns and the completion text of ``row``; DataError naming the row for a malformed one."""
        if self.completion is None:
            turns = _messages(row.get(self.prompt), f"{where}: column {self.prompt!r}")
            if not turns or turns[-1]["role"] != "assistant":
                last = turns[-1]["role"] if turns else "no turn"
                raise DataError(
                    f"{where}: the conversation in {self.prompt!r} must end with an assistant turn (the completion); "
                    f"it ends with {last}"
                )
            return turns[:-1], turns[-1]["content"]
        prompt = row.get(self.prompt)
        if isinstance(prompt, list):
            turns = _messages(prompt, f"{where}: column {self.prompt!r}")
        else:
            text = _text(prompt)
            extra = _text(row.get(self.input)) if self.input else ""
            turns = [{"role": "user", "content": f"{text}\n\n{extra}" if extra.strip() else text}]
        completion = row.get(self.completion)
        if isinstance(completion, list):
            answer = _messages(completion, f"{where}: column {self.completion!r}")
            if len(answer) != 1 or answer[0]["role"] != "assistant":
                raise DataError(
                    f"{where}: column {self.completion!r} as a list must hold one assistant message; "
                    f"it has {', '.join(t['role'] for t in answer) or 'none'}"
                )
            return turns, answer[0]["content"]
        return turns, _text(completion)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A list of ``{role, content}`` with known roles, as plain dicts of strings."""
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of {{role, content}} messages; got {str(value)[:80]!r}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: message {i + 1} is not a {{role, content}} object: {str(turn)[:80]!r}")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: message {i + 1} has the role {turn['role']!r}; roles are {', '.join(ROLES)}")
        turns.append({"role": turn["role"], "content": _text(turn["content"])})
    return turns
