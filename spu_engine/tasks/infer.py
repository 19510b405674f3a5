"""Which task a data source (and model) means when ``--task`` is not given.

SQuAD-shaped data is ``qa``; plain text (``.raw`` / ``.txt``, or a table with a
text column but no label column) is ``lm``; a table with a label column is
``classification``.  A table in one of supervised fine-tuning's shapes (``messages``,
``prompt`` / ``completion``, ``instruction`` / ``output``, ``question`` / ``answer``
without a ``context``: see ``sft_shapes``) is ``sft`` for a decoder-only model, as is
any table when ``--prompt-column`` or ``--completion-column`` is given.  A hub name is
judged by its name (``squad*`` -> qa, ``wikitext*`` -> lm, a few well-known SFT sets
-> sft with a decoder-only model, anything else classification).  A text-only table
is ``lm`` only for a decoder-only model; for an encoder the data is ambiguous and the
message asks for ``--task``.
"""

from __future__ import annotations

import json
from pathlib import Path

from spu_engine.core.data import TEXT_ENCODING, DataError, is_local, no_rows, read_rows, split_files
from spu_engine.tasks.sft_shapes import sft_shape

QA_KEYS = {"question", "context", "answers"}
LABEL_KEYS = ("label", "labels", "target", "class", "Quality")  # Quality: the label of GLUE's own MRPC files
QA_HUB = ("squad", "rajpurkar/squad", "adversarial_qa", "mrqa")
LM_HUB = (
    "wikitext",
    "salesforce/wikitext",
    "ptb_text_only",
    "openwebtext",
    "tiny_shakespeare",
    "roneneldan/tinystories",
)
SFT_HUB = ("gsm8k", "openai/gsm8k", "tatsu-lab/alpaca", "yahma/alpaca-cleaned", "huggingfaceh4/no_robots")
TASK_NAMES = "classification, qa, lm or sft"


class TaskUnclear(DataError):
    """The data reads fine but fits no task, or more than one: ``--task`` has to say."""


def infer_task(
    data: str,
    model: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    completion_column: str | None = None,
) -> str:
    """'classification', 'qa', 'lm' or 'sft' for ``data``; DataError when it cannot be read, TaskUnclear when it
    fits no task.

    A ``label_column`` the table has makes it classification (``--label-column`` needs no ``--task``); a
    ``prompt_column`` or ``completion_column`` makes it sft.
    """
    if prompt_column is not None or completion_column is not None:
        return "sft"

    def decoder() -> bool:
        return model is not None and is_decoder_only(model)

    if not is_local(data):
        name = data.lower()
        if name.startswith(QA_HUB):
            return "qa"
        if name.startswith(LM_HUB):
            return "lm"
        if name.startswith(SFT_HUB) and decoder():
            return "sft"
        return "classification"
    path = split_files(data)["train"]
    suffix = path.suffix.lower()
    if suffix in (".raw", ".txt"):
        return "lm"
    if suffix == ".json" and _is_nested_squad(path):
        return "qa"
    rows = read_rows(path)
    if not rows:
        raise DataError(no_rows(path))
    keys = set(rows[0])
    if keys >= QA_KEYS:
        return "qa"
    if label_column is not None and label_column in keys:
        return "classification"
    shape = sft_shape(keys)
    if shape is not None and decoder():
        return "sft"
    if keys & set(LABEL_KEYS):
        return "classification"
    if decoder():
        return "lm"
    columns = ", ".join(sorted(map(str, keys))) or "none"
    if shape is not None:
        raise TaskUnclear(
            f"{path} is supervised fine-tuning data ({shape} columns), which needs a causal LM "
            f"(GPT-2, Llama, ...) as --model; or pass --task {TASK_NAMES}"
        )
    raise TaskUnclear(
        f"cannot tell the task of {path}: it has no label column ({', '.join(LABEL_KEYS)}), no SQuAD fields "
        f"and no prompt/completion columns (columns: {columns}); pass --task {TASK_NAMES}"
    )


def _is_nested_squad(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding=TEXT_ENCODING))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    articles = data.get("data") if isinstance(data, dict) else None
    return (
        isinstance(articles, list) and bool(articles) and isinstance(articles[0], dict) and "paragraphs" in articles[0]
    )


def is_decoder_only(model: str) -> bool:
    """True when the model's config describes a causal LM without an encoder (GPT-2, Llama, ...)."""
    from spu_engine.core.model_source import resolve_model_name

    name = resolve_model_name(model)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
    except Exception:
        return False
    return config_is_decoder_only(config)


def config_is_decoder_only(config) -> bool:
    """A causal LM architecture without an encoder: its attention never looks right, so right padding is unseen."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def config_is_encoder_only(config) -> bool:
    """A bidirectional encoder (BERT, RoBERTa, MiniLM, ...): a masked-LM architecture not set up as a decoder, whose
    attention sees the very token a causal LM is asked to predict."""
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
