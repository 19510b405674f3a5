"""A run's settings: what it computes (``RunSettings``) and where it runs (``EngineConfig``).

``RunSettings`` is also the ``run:`` section of a policy, so an exported policy
replays its run alone.  This module imports only pydantic (the task registry,
which needs torch, only when a task name is checked), so the policy module can
import it without an import cycle or a heavy import.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

POOLINGS = ("cls", "mean")  # spu_engine.model.pooling's (which imports torch)


class RunSettings(BaseModel):
    """Everything that decides what a run computes: with the policy's sections and timeline, the same
    settings give the same per-step losses (on the same hardware).

    Where a run happens (``device``, ``threads``) is left out on purpose: a replay on another
    machine uses that machine's, and naming a GPU that is not there would make a file fail to
    replay.  Cadences that do not touch the loss (statistics, checkpoints) are kept so a replay
    writes the same run folder; evaluation cadence and samples matter (weight-update skipping
    switches phase on eval loss).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # --lr inf is a typo, not a setting

    model: str = Field("minilm", description="hub id, local Hugging Face folder, or 'minilm' (the offline package)")
    data: str = Field("glue/sst2", description="hub dataset or local file / folder with train and dev files")
    task: str = Field(
        "auto",
        validate_default=True,
        description="classification | qa | lm | sft; auto: inferred from the data and model (sft: prompt/completion-shaped "
        "data with a causal LM)",
    )
    steps: int = Field(1000, ge=1, description="optimizer steps; the LR schedule is laid over them")
    batch_size: int = Field(32, ge=1, description="training examples per optimizer step")
    eval_batch_size: int = Field(128, ge=1, description="examples per forward pass in evaluation")
    max_length: int = Field(128, ge=8, description="tokens per example (lm: a block; qa: a window of a long context)")
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup: float = Field(
        0.06, ge=0, description="warmup steps, or a fraction of steps when < 1; then linear decay to 0 at the last step"
    )
    grad_clip: float = Field(1.0, ge=0, description="largest gradient norm (clipped to it); 0 disables clipping")
    eval_every: int = Field(100, ge=0, description="evaluate every N steps; 0: only at the end")
    stats_every: int = Field(10, ge=1, description="per-unit statistics every N steps")
    checkpoint_every: int | None = Field(
        None,
        ge=0,
        description="checkpoint every N steps (default: unset, every checkpoint_minutes of training time); 0: no "
        "checkpoint but on request and at the end (a crash loses the run)",
    )
    checkpoint_minutes: float = Field(
        10.0,
        ge=0,
        description="with checkpoint_every unset: checkpoint after every this many minutes of training (steps only, not "
        "evaluations or pauses), so a crash loses at most that; the newest keep_checkpoints stay on disk; 0: off",
    )
    keep_checkpoints: int = Field(3, ge=1, description="the newest N checkpoints are kept, older ones deleted")
    max_train_samples: int | None = Field(None, description="train on at most N examples (default: all)")
    max_eval_samples: int | None = Field(None, description="evaluate on at most N examples (default: all)")
    text_column: str | None = Field(
        None,
        description="classification: the text column, or two separated by a comma for sentence pairs "
        "(sentence1,sentence2) (default: the first pair the table has: sentence1/sentence2, question/sentence, "
        "'#1 String'/'#2 String', question1/question2, premise/hypothesis; else one of sentence, text, review, ...)",
    )
    label_column: str | None = Field(
        None, description="classification: the label column (default: label, labels, target, class or Quality)"
    )
    metric: str | None = Field(
        None,
        pattern="^(accuracy|f1|mcc)$",
        description="classification: the headline eval metric, accuracy | f1 (of the positive class, label 1) "
        "| mcc (Matthews correlation); default: GLUE's for data named like a GLUE task (f1 for mrpc and qqp, "
        "mcc for cola), else accuracy",
    )
    pooling: str | None = Field(
        None,
        description="classification: what the head sees, cls (the [CLS] token, through the model's own pooler) | mean "
        "(the mean of the last hidden states over the real tokens, straight to the classifier); default: the "
        "checkpoint's own where its folder says (a sentence-transformers modules.json and its Pooling config: "
        "the offline MiniLM says mean), else cls",
    )
    doc_stride: int | None = Field(
        None, ge=1, description="qa: tokens shared by consecutive windows of a long context (default max_length // 3)"
    )
    prompt_column: str | None = Field(
        None,
        description="sft: the prompt column, a string or a list of {role, content} messages (default: the data's "
        "shape: messages, whose last assistant turn is the completion; prompt; instruction (+ input); question)",
    )
    completion_column: str | None = Field(
        None, description="sft: the completion column, the answer the loss counts (default: completion, output, answer)"
    )
    generate_eval: int = Field(
        0,
        ge=0,
        description="sft: at each evaluation, greedy generations for the first N eval prompts, scored by exact match "
        "of the final answer where the references have one (GSM8K's '#### 72'), a few shown in the log; 0: none",
    )
    max_new_tokens: int = Field(256, ge=1, description="sft: the most tokens generated per prompt by --generate-eval")
    drop_unlabelled: bool = Field(
        False,
        description="classification: leave out rows whose label is missing or empty, counted in the run's log; "
        "off: such rows are refused, naming the file and the rows",
    )
    eval_split: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="share of the training data held out for eval when the data has no eval split (default 0.1; 0: eval on train)",
    )
    seed: int = Field(0, description="random seed")
    precision: str = Field(
        "auto",
        pattern="^(auto|fp32|bf16|fp16)$",
        description="auto | fp32 | bf16 | fp16; auto: bf16 on a GPU that has it, else fp16 on a GPU, fp32 elsewhere",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model in place (nn.Module.compile; backend inductor, or $SPU_COMPILE_BACKEND): "
        "faster steps after a slow first one; a live change to what trains or to the modules a method wraps recompiles "
        "the model once, said in the step event and the log, and the what-if says it before, warning when a change "
        "would pass torch's recompile limit (raised from 8 to 32; $SPU_RECOMPILE_LIMIT), past which new configurations "
        "run uncompiled",
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="experiment trackers that mirror every metric and policy change: "
        "tensorboard (into <run>/tensorboard), wandb, mlflow, trackio; "
        "a list, or one comma-separated string (tensorboard,wandb); none: no tracker",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, report_to):
        from spu_engine.core.trackers import TRACKERS

        if isinstance(report_to, str):
            report_to = [name.strip() for name in report_to.split(",") if name.strip()]
        if not isinstance(report_to, list) or not all(isinstance(name, str) for name in report_to):
            raise ValueError("a tracker name or a list of them")
        report_to = [name for name in report_to if name != "none"]
        for name in report_to:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}; trackers are {', '.join(TRACKERS)} (or none)")
        return list(dict.fromkeys(report_to))

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        from spu_engine.tasks import get_task

        if task != "auto":
            get_task(task)
        return task

    @field_validator("text_column")
    @classmethod
    def _one_or_two_columns(cls, text_column: str | None) -> str | None:
        if text_column is not None and (
            text_column.count(",") > 1 or not all(part.strip() for part in text_column.split(","))
        ):
            raise ValueError("one column, or two separated by a comma for sentence pairs (sentence1,sentence2)")
        return text_column

    @model_validator(mode="after")
    def _resolve_task(self) -> RunSettings:
        """'auto' becomes the task the data (and model, and label column) imply, so config.json records the real one.

        An error names the setting to fix: ``data:`` for data that cannot be read, ``task:`` for data that fits no task.
        """
        from spu_engine.core.data import DataError
        from spu_engine.tasks import TaskUnclear, infer_task

        if self.task != "auto":
            return self
        try:
            self.task = infer_task(
                self.data,
                self.model,
                label_column=self.label_column,
                prompt_column=self.prompt_column,
                completion_column=self.completion_column,
            )
        except TaskUnclear as exc:
            raise ValueError(f"task: {exc}") from None
        except DataError as exc:
            raise ValueError(f"data: {exc}") from None
        return self

    @field_validator("pooling")
    @classmethod
    def _known_pooling(cls, pooling: str | None) -> str | None:
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"{pooling!r} is not a pooling; choose one of {' | '.join(POOLINGS)}")
        return pooling

    @model_validator(mode="after")
    def _resolve_pooling(self) -> RunSettings:
        """Unset becomes the checkpoint's own pooling (``checkpoint_pooling``), so config.json records the real one;
        only classification pools."""
        from spu_engine.core.checkpoint_pooling import checkpoint_pooling

        if self.task != "classification":
            if self.pooling is not None:
                raise ValueError(f"pooling: --pooling is for classification; this run's task is {self.task}")
        elif self.pooling is None:
            self.pooling = checkpoint_pooling(self.model)[0]
            self.__pydantic_fields_set__.discard("pooling")  # the model's default, not a setting another --model keeps
        return self

    @model_validator(mode="after")
    def _metric_is_for_classification(self) -> RunSettings:
        if self.metric is not None and self.task != "classification":
            raise ValueError(
                f"metric: --metric {self.metric} is for classification; {self.task} reports its own (qa: f1 and exact_match, lm and sft: perplexity)"
            )
        return self

    @model_validator(mode="after")
    def _sft_settings_are_for_sft(self) -> RunSettings:
        given = [
            name
            for name, value in (
                ("prompt_column", self.prompt_column),
                ("completion_column", self.completion_column),
                ("generate_eval", self.generate_eval or None),
            )
            if value is not None
        ]
        if given and self.task != "sft":
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(
                f"{given[0]}: {flag} is for supervised fine-tuning (--task sft); this run's task is {self.task}"
            )
        return self

    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)


class EngineConfig(RunSettings):
    """Everything about a run that is not the policy: its ``RunSettings`` and where it runs."""

    device: str = Field("auto", description="where the engine runs: auto, cpu, cuda, cuda:1")
    threads: int | None = Field(
        None,
        description="CPU threads for the engine (default: torch's choice; a replayed policy's machine: threads, when "
        "this machine has that many cores)",
    )
    system_every: float = Field(
        10.0, ge=0, description="seconds between two system events (GPU, CPU, RAM, throughput); 0: none"
    )
    plan_peft: str | None = Field(
        None,
        pattern="^(lora|ia3|adapter)$",
        description="under torchrun: build this PEFT method's tensors (with the policy's peft settings: r, alpha, "
        "target_modules, size) before the model is sharded, switched off, so a live switch to it from the console "
        "works; the policy's timeline plans its own switches without this",
    )
    sharding: str = Field(
        "full_shard",
        pattern="^(full_shard|shard_grad_op|hybrid_shard)$",
        description="under torchrun / accelerate launch, how FSDP2 spreads the model over the ranks: full_shard "
        "(weights, gradients and optimizer state sharded; weights gathered per block for each pass), shard_grad_op "
        "(gradients and optimizer state sharded, weights kept whole between forward and backward: faster, more "
        "memory) or hybrid_shard (full_shard within a node, replicated across nodes: a 2-D mesh of nodes x "
        "LOCAL_WORLD_SIZE); one process: no effect",
    )

    def run_settings(self) -> RunSettings:
        """The settings a policy's ``run:`` section records (no device, no threads).

        A model or data path relative to the working folder is made absolute, so the file
        replays from anywhere on this machine.
        """
        data = self.model_dump(include=set(RunSettings.model_fields))
        for key in ("model", "data"):
            path = Path(data[key]).expanduser()
            if not path.is_absolute() and path.exists():
                data[key] = str(path.resolve())
        return RunSettings.model_validate(data)


def recorded(settings: dict) -> dict:
    """A run's config.json as settings: one written before the pooling setting existed pooled [CLS], whatever its
    model's folder says now."""
    if settings.get("task") == "classification" and "pooling" not in settings:
        return {**settings, "pooling": "cls"}
    return settings
