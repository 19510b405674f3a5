"""What the SFT tests share: a chat template, three examples of each data shape, writing JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path

# a small template: '<user> Q <assistant> A ' (the generation prompt is '<assistant> ')
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)

# three examples of each shape: the rows, and each one's prompt turns as the template renders them and its completion
SHAPES = {
    "messages": [
        (
            {"messages": [{"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": "#### 5"}]},
            "<user> what is 2 + 3? ",
            "#### 5",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "name a colour"},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "another one"},
                    {"role": "assistant", "content": "blue"},
                ]
            },
            "<system> be brief <user> name a colour <assistant> red <user> another one ",
            "blue",
        ),
        (
            {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]},
            "<user> say hi ",
            "hi there",
        ),
    ],
    "prompt/completion": [
        ({"prompt": "the capital of france", "completion": "paris"}, "<user> the capital of france ", "paris"),
        ({"prompt": "one plus one", "completion": "two"}, "<user> one plus one ", "two"),
        (
            {"prompt": [{"role": "user", "content": "count to three"}], "completion": "one two three"},
            "<user> count to three ",
            "one two three",
        ),
    ],
    "alpaca": [
        (
            {"instruction": "translate to french", "input": "good morning", "output": "bonjour"},
            "<user> translate to french\n\ngood morning ",
            "bonjour",
        ),
        ({"instruction": "give a prime", "input": "", "output": "seven"}, "<user> give a prime ", "seven"),
        (
            {"instruction": "add the numbers", "input": "4 and 5", "output": "#### 9"},
            "<user> add the numbers\n\n4 and 5 ",
            "#### 9",
        ),
    ],
    "question/answer": [
        (
            {"question": "natalia sold 48 clips and half as many more. how many?", "answer": "48 + 24 = 72\n#### 72"},
            "<user> natalia sold 48 clips and half as many more. how many? ",
            "48 + 24 = 72\n#### 72",
        ),
        ({"question": "how many legs has a cat?", "answer": "#### 4"}, "<user> how many legs has a cat? ", "#### 4"),
        ({"question": "what is 10 - 3?", "answer": "#### 7"}, "<user> what is 10 - 3? ", "#### 7"),
    ],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
