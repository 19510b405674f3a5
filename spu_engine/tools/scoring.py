"""``spu eval``: score a trained model on labelled data, with the task's metric, e.g. a policy on data it never trained on.

The model is a run folder or a model folder (``spu export``: a model, a peft adapter folder or a Houlsby-adapter
folder, which ``spu_export.json`` names; or any HF folder or hub id with a trained head).
A run is scored at its newest checkpoint whose weights verify, loaded by the engine's own resume path, so PEFT
adapters, pruning masks and every method's state count exactly as they trained; a model folder is handed to
an engine as it is.  Either way the engine's ``evaluate`` computes the figures.  Classification labels are
matched to the model's class ids by name (checkpoints record the names, exports carry them in ``id2label``);
a model that names its classes otherwise (``NEGATIVE``/``POSITIVE``) takes integer labels as class ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spu_engine.core.collapse import collapse_note
from spu_engine.core.config import EngineConfig, recorded
from spu_engine.core.data import (
    SPLIT_NAMES,
    DataError,
    data_metric,
    find_split,
    glue_task,
    hub_split,
    is_local,
    load_hub,
    read_rows,
)
from spu_engine.core.runs import CHECKPOINTS, CONFIG
from spu_engine.model.loading import class_names, load_model, load_tokenizer
from spu_engine.storage.checkpoint import OPTIMIZER, CheckpointError, list_checkpoints, read_state, verify
from spu_engine.tasks import Task, TaskOptions, TaskUnclear, get_task, infer_task
from spu_engine.tasks.classification import ClassificationTask, Columns, train_label_ids
from spu_engine.tasks.sft_generate import Generation
from spu_engine.tools.export.card import read_info
from spu_engine.tools.export.houlsby import load_export

TASK_OF_HEAD = (
    ("ForSequenceClassification", "classification"),
    ("ForQuestionAnswering", "qa"),
    ("ForCausalLM", "lm"),
    ("LMHeadModel", "lm"),
)


class ScoreError(ValueError):
    """The model or the data cannot be scored; one line says why."""


@dataclass
class ScoreOptions:
    split: str | None = None  # train | dev | test | a file (None: dev, else test)
    metric: str | None = (
        None  # classification: accuracy | f1 | mcc (None: the data's GLUE metric, else the run's, else accuracy)
    )
    text_column: str | None = None
    label_column: str | None = None
    max_length: int | None = None  # None: the run's, else 128
    batch_size: int = 128
    max_samples: int | None = None
    device: str = "auto"
    prompt_column: str | None = None  # sft: None: the run's, else the data's shape decides
    completion_column: str | None = None
    generate_eval: int | None = None  # sft: prompts answered by greedy generation (None: the run's, else none)
    max_new_tokens: int | None = None  # None: the run's, else 256


@dataclass
class Score:
    model: str
    checkpoint: str | None  # the run's checkpoint that was scored; None for a model folder
    data: str  # the file (or hub split) scored
    task: str
    metric: str  # the headline
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)  # sft with generate_eval: what the model answered

    @property
    def collapsed(self) -> str | None:
        """What to say when the model gave (nearly) every example one class: its metrics are that class's share."""
        return collapse_note(self.metrics)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "data": self.data,
            "task": self.task,
            "metric": self.metric,
            "value": self.metrics.get(self.metric),
            "metrics": self.metrics,
            "collapsed": self.collapsed,
            "notes": self.notes,
            "generations": [asdict(g) for g in self.generations],
        }


def score(model: str, data: str, options: ScoreOptions) -> Score:
    """Score ``model`` (a run folder, a model folder or a hub id) on a split of ``data``; ScoreError / DataError / CheckpointError for bad input."""
    from spu_engine.loop.engine import Engine

    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.exists():
        raise ScoreError(f"--model {model}: no such folder")
    notes: list[str] = []
    if (path / CHECKPOINTS).is_dir():
        config, checkpoint, state = newest_weights(path, notes)
        kind = config.task
        tokenizer = load_tokenizer(config.model)
        names = (state.get("label_names") or _trained_labels(config)) if kind == "classification" else None
        trained_metric = config.metric or data_metric(config.data)
        loaded = None
    elif (info := read_info(path) if path.is_dir() else None) and info["format"] != "model":
        kind = _sft_or(info["task"], model, data, options)  # an adapter export: no stock config.json says the head
        loaded, tokenizer = load_export(path, info), load_tokenizer(info["base_model"])
        names = class_names(loaded.config) if kind == "classification" else None
        checkpoint, trained_metric = None, info.get("metric") or "accuracy"
        config = EngineConfig(model=model, data=data, task=kind, max_length=info["max_length"])
    else:
        if path.is_dir() and not (path / "config.json").is_file():
            raise ScoreError(
                f"--model {model}: neither a run folder (no checkpoints/) nor a model folder (no config.json)"
            )
        kind = _sft_or(_task_of(model), model, data, options)
        loaded = load_model(model, get_task(kind).model_kind, num_labels=None, trained=True)
        tokenizer = load_tokenizer(model)
        names = class_names(loaded.config) if kind == "classification" else None
        checkpoint, trained_metric = None, "accuracy"
        trained_length = {"max_length": info["max_length"]} if info else {}  # an export: the run's, as it evaluated
        config = EngineConfig(model=model, data=data, task=kind, **trained_length)
    if options.metric is not None and kind != "classification":
        raise ScoreError(f"--metric is for classification; this {kind} model reports its own")
    task_options = TaskOptions(
        max_length=options.max_length or config.max_length,
        text_column=options.text_column,
        label_column=options.label_column,
        max_eval_samples=options.max_samples,
        eval_split=0,
        max_train_samples=1,
        metric=options.metric or (data_metric(data) if glue_task(data) else trained_metric),
        prompt_column=options.prompt_column or config.prompt_column,
        completion_column=options.completion_column or config.completion_column,
        generate_eval=config.generate_eval if options.generate_eval is None else options.generate_eval,
        max_new_tokens=options.max_new_tokens or config.max_new_tokens,
    )
    task, source = _task(kind, data, options.split, tokenizer, task_options, names, notes)
    settings = config.model_copy(
        update={"device": options.device, "eval_batch_size": options.batch_size, "threads": None}
    )
    engine = Engine(
        settings, None, None, model=loaded, tokenizer=tokenizer, task=task
    )  # no sinks: its warnings are about training
    if checkpoint is not None:
        engine.resume_from(
            checkpoint, fresh_optimizer=True
        )  # the optimizer plays no part in scoring: a damaged optimizer.pt does not stop it
    metrics = engine.evaluate()
    generations = getattr(task, "generations", [])
    return Score(model, str(checkpoint) if checkpoint else None, source, kind, task.metric, metrics, notes, generations)


def newest_weights(run: Path, notes: list[str]) -> tuple[EngineConfig, Path, dict[str, Any]]:
    """A run folder's settings and its newest checkpoint whose weights verify (a newer one that does not is named in ``notes``)."""
    try:
        config = EngineConfig(**recorded(json.loads((run / CONFIG).read_text(encoding="utf-8"))))
    except FileNotFoundError:
        raise ScoreError(f"{run} has checkpoints/ but no config.json: not a run folder SPU wrote") from None
    except (OSError, ValueError) as exc:
        raise ScoreError(
            f"{run / CONFIG} cannot be read ({str(exc).splitlines()[0]}); the settings are also in each checkpoint's state.json"
        ) from None
    damaged = []
    for path in reversed(list_checkpoints(run / CHECKPOINTS)):
        problem = verify(path, ignore=(OPTIMIZER,))
        if problem is None:
            if damaged:
                notes.append(
                    f"scored {path.name}, the newest checkpoint whose weights verify; skipped {'; '.join(damaged)}"
                )
            return config, path, read_state(path, ignore=(OPTIMIZER,))
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise CheckpointError(f"{run / CHECKPOINTS}: no checkpoint whose weights verify ({'; '.join(damaged)})")
    raise CheckpointError(
        f"{run / CHECKPOINTS} holds no checkpoint yet (one is written every --checkpoint-every steps, at the end, and on `s`)"
    )


def _trained_labels(config: EngineConfig) -> list[str]:
    """Checkpoints written before SPU recorded label names: the labels of the run's training data, numbered as training did."""
    try:
        ids = train_label_ids(config.data, TaskOptions.of(config))
    except DataError as exc:
        raise ScoreError(
            f"this run's checkpoints do not record its labels, and its training data cannot be read for them: {exc}"
        ) from None
    return sorted(ids, key=ids.get)


def _task_of(model: str) -> str:
    """classification, qa or lm, read off the architecture a model folder's config names."""
    from transformers import AutoConfig

    from spu_engine.core.model_source import ModelLoadError, check_source, resolve_model_name

    name = resolve_model_name(model)
    check_source(name)
    try:
        architectures = AutoConfig.from_pretrained(name).architectures or []
    except Exception as exc:
        raise ModelLoadError(f"cannot read the config of {model!r}: {str(exc).strip().splitlines()[0][:300]}") from None
    kind = next((k for a in architectures for suffix, k in TASK_OF_HEAD if a.endswith(suffix)), None)
    if kind is None:
        raise ScoreError(
            f"--model {model}: its config names no task head "
            f"({', '.join(architectures) or 'no architectures'}); export a trained run with `spu export`"
        )
    return kind


def _sft_or(kind: str, model: str, data: str, options: ScoreOptions) -> str:
    """A causal LM scored on prompt / completion data (an SFT export) is scored as sft, else as ``kind``."""
    if kind != "lm":
        return kind
    try:
        inferred = infer_task(
            data, model, prompt_column=options.prompt_column, completion_column=options.completion_column
        )
    except TaskUnclear:
        return kind
    return "sft" if inferred == "sft" else kind


def _task(
    kind: str, data: str, split: str | None, tokenizer, options: TaskOptions, names: list[str] | None, notes: list[str]
) -> tuple[Task, str]:
    """The eval set: rows of the split, labels mapped to the model's class ids (classification), or the task built on one file."""
    if kind != "classification":
        if not is_local(data) and split in (None, "dev"):
            return get_task(kind).build(data, tokenizer, options), f"{data} (dev)"
        path = _split_file(data, split)
        return get_task(kind).build(str(path), tokenizer, options), str(path)
    rows, source = _split_rows(data, split)
    return ClassificationTask.scoring(
        rows, source, tokenizer, options, _label_ids(names or [], rows, options, source, notes)
    ), source


def _split_file(data: str, split: str | None) -> Path:
    """The local file ``--split`` names: train, dev or test of the folder ``data`` (None: dev, else test), or a file."""
    if split is not None and split not in SPLIT_NAMES:
        path = Path(split).expanduser()
        if not path.is_file() and is_local(data) and (Path(data).expanduser() / split).is_file():
            path = Path(data).expanduser() / split
        if not path.is_file():
            raise ScoreError(f"--split {split}: not train, dev or test, and no such file")
        return path
    if not is_local(data):
        raise ScoreError(f"--split {split} of the hub dataset {data!r}: qa and lm score a local file here")
    folder = Path(data).expanduser()
    if not folder.exists():
        raise DataError(f"data path {data!r} does not exist")
    if folder.is_file():
        return folder
    found = find_split(folder, SPLIT_NAMES[split] if split else SPLIT_NAMES["dev"] + SPLIT_NAMES["test"])
    if found is None:
        listing = ", ".join(sorted(f.name for f in folder.iterdir() if f.is_file())) or "nothing"
        wanted = split or "dev or test"
        raise ScoreError(f"{data} has no {wanted} file (found {listing}); pass --split train, dev, test or a file")
    return found


def _split_rows(data: str, split: str | None) -> tuple[list[dict[str, Any]], str]:
    if is_local(data) or (split is not None and split not in SPLIT_NAMES):
        path = _split_file(data, split)
        return read_rows(path), str(path)
    ds = load_hub(data)
    rows = hub_split(ds, split or "dev") or (hub_split(ds, "test") if split is None else None)
    if rows is None:
        raise ScoreError(f"hub dataset {data!r} has no {split or 'dev or test'} split (splits: {', '.join(ds.keys())})")
    return rows, f"{data} ({split or 'dev'})"


def _label_ids(
    names: list[str], rows: list[dict[str, Any]], options: TaskOptions, source: str, notes: list[str]
) -> dict[str, int]:
    """The model's class id of each label, by name; integer labels are class ids when the model names its classes otherwise."""
    by_name = {name: i for i, name in enumerate(names)}
    column = Columns.of(rows, options, source).label
    labels = {str(r.get(column)) for r in rows}
    if labels <= set(by_name) or not all(label.isdigit() and int(label) < len(names) for label in labels):
        return by_name
    notes.append(f"the model names its classes {names}, the data numbers them: label i is class id i")
    return {str(i): i for i in range(len(names))}
