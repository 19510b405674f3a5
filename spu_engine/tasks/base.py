"""The task interface shared by classification, extractive QA, causal LM and supervised fine-tuning."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from spu_engine.core.data import DataError
from spu_engine.loop.batching import lengths_of, pad_collate


@dataclass
class TaskOptions:
    max_length: int = 128
    text_column: str | None = None
    label_column: str | None = None
    metric: str | None = None  # classification: accuracy | f1 | mcc (None: the data's, see data.data_metric)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    doc_stride: int | None = None  # qa: tokens shared by consecutive windows of a long context (None: max_length // 3)
    eval_split: float | None = (
        None  # share held out for eval when the data has no eval split (None: DEFAULT_EVAL_SPLIT; 0: eval on train)
    )
    seed: int = 0  # which rows are held out
    prompt_column: str | None = None  # sft: None: the data's shape decides (sft_shapes)
    completion_column: str | None = None
    generate_eval: int = 0  # sft: eval prompts answered by greedy generation at each evaluation
    max_new_tokens: int = 256  # sft: the most tokens generated per prompt
    drop_unlabelled: bool = False  # classification: leave out rows without a label (else they are refused)

    @classmethod
    def of(cls, settings: Any) -> TaskOptions:
        """The options named alike in ``settings`` (an EngineConfig)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class Task(ABC):
    """Tokenized train / eval features plus the loss and metrics of one kind of task."""

    name: ClassVar[str]
    model_kind: ClassVar[str]
    metric: str  # the headline eval metric: what the console plots, `spu runs` lists and `spu eval` reports
    eval_fields: tuple[str, ...]  # the numbers ``evaluate`` returns (what a when-trigger may watch)
    num_labels: int = 2
    label_names: list[str] | None = None  # classification: the label of each class id
    groups_by_length: ClassVar[bool] = False  # batches drawn by length, so they pad little (examples vary in length)

    def __init__(self, train: list[dict[str, Any]], eval: list[dict[str, Any]], pad_id: int) -> None:
        self.train = train
        self.eval = eval
        self.pad_id = pad_id
        self.notes: list[str] = []  # what the run must say about the data (a held-out eval share); logged as warnings

    @classmethod
    @abstractmethod
    def build(cls, source: str, tokenizer, options: TaskOptions) -> Task:
        """Read and tokenize ``source`` (hub name or local path)."""

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_collate(features, self.pad_id)

    def outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The task's logits for ``batch`` (classification and LM: one tensor; QA: start and end)."""
        return (model(**model_inputs(model, batch)).logits,)

    @abstractmethod
    def loss_from(self, outputs: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of each sample in the batch, shape [B], from ``outputs``."""

    def per_sample_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of each sample in the batch, shape [B]."""
        return self.loss_from(self.outputs(model, batch), batch)

    def per_sample_kl(
        self,
        student: tuple[torch.Tensor, ...],
        teacher: tuple[torch.Tensor, ...],
        batch: dict[str, torch.Tensor],
        temperature: float,
    ) -> torch.Tensor:
        """KL(teacher || student) of each sample at ``temperature``, shape [B]; QA averages its start and end."""
        return sum(kl_rows(s, t, temperature) for s, t in zip(student, teacher)) / len(student)

    @abstractmethod
    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Metrics over an iterable of eval batches (already on the model's device)."""

    def shown(self) -> list[str]:
        """Readable lines about the last evaluation, logged after its eval event (SFT: what the model now answers,
        as ``about: generation``)."""
        return []

    def check_fits(self, model: nn.Module) -> None:
        """A sequence longer than the model's position table fails deep inside its forward: say so before training."""
        config = getattr(model, "config", None)
        limit = next(
            (
                getattr(config, k)
                for k in ("n_positions", "max_position_embeddings")
                if isinstance(getattr(config, k, None), int)
            ),
            None,
        )
        longest = max((*lengths_of(self.train), *lengths_of(self.eval)), default=0)
        if limit is not None and longest > limit:
            raise DataError(
                f"--max-length: sequences of {longest} tokens do not fit this model's {limit} positions; use --max-length {limit} or less"
            )


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) over the last dimension, in fp32: one value per row."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)


TARGET_KEYS = ("labels", "start_positions", "end_positions", "feature_index")


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch fields ``model.forward`` takes, targets left out.

    A tokenizer may emit ``token_type_ids`` that the model has no embedding for
    (a BERT tokenizer with DistilBERT or GPT-2): they are dropped rather than
    passed on, where they would fail or silently index the word embeddings.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS and k in accepted}
    config = getattr(base, "config", None)
    if "token_type_ids" in inputs and getattr(config, "type_vocab_size", 0) < 2:
        del inputs["token_type_ids"]
    mask = inputs.get("attention_mask")
    if config is not None and mask is not None and mask.dim() == 2:
        _mask_without_host_checks(inputs, mask, config)
    return inputs


def _mask_without_host_checks(inputs: dict[str, torch.Tensor], mask: torch.Tensor, config) -> None:
    """The padding mask in a form transformers does not read on the host (its check whether a 2-D mask can be
    skipped is a host-device sync every forward).  Batches are padded on the right: a causal decoder never attends
    to what comes after a token, so it needs no mask at all (its padded positions have no label); an encoder on
    SDPA gets the 4-D boolean mask transformers would build.  The outputs are the same to the bit."""
    from spu_engine.tasks.infer import config_is_decoder_only

    if config_is_decoder_only(config):
        del inputs["attention_mask"]
    elif getattr(config, "_attn_implementation", None) == "sdpa" and not getattr(config, "is_decoder", False):
        inputs["attention_mask"] = mask[:, None, None, :].bool()
