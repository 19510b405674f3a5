"""Classification labels checked before training: a row without one is refused (or dropped and counted), one class is
refused, a head of another size is said in SPU's words, and a file with only its header says so."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.config import RunSettings
from spu_engine.core.data import DataError
from spu_engine.core.model_source import ModelLoadError
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask


def one_in_seven_unlabelled(path):
    """21 rows, labels 0 / 1, the 7th, 14th and 21st with an empty label (the issue's case)."""
    lines = [f"sentence number {i}\t{'' if i % 7 == 6 else i % 2}" for i in range(21)]
    path.write_text("sentence\tlabel\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_rows_without_a_label_are_refused_naming_the_file_the_rows_and_the_count(tmp_path, tokenizer):
    data = one_in_seven_unlabelled(tmp_path / "train.tsv")
    with pytest.raises(DataError) as caught:
        ClassificationTask.build(str(data), tokenizer, TaskOptions(max_length=16))
    message = str(caught.value)
    assert f"{data}: 3 of 21 rows have no label in column 'label' (rows 7, 14, 21)" in message
    assert "--drop-unlabelled" in message
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    rows[2] = {"text": "no label field"}
    rows[4]["label"] = None
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=re.escape("2 of 10 rows have no label in column 'label' (rows 3, 5)")):
        ClassificationTask.build(str(tmp_path / "data.jsonl"), tokenizer, TaskOptions(max_length=16))


def test_drop_unlabelled_drops_counts_and_says_so(tmp_path, tokenizer):
    data = one_in_seven_unlabelled(tmp_path / "train.tsv")
    task = ClassificationTask.build(str(data), tokenizer, TaskOptions(max_length=16, drop_unlabelled=True))
    assert task.label_names == ["0", "1"] and task.num_labels == 2
    assert len(task.train) + len(task.eval) == 18
    assert any(
        "3 of 21 rows have no label" in n and "dropped (--drop-unlabelled), 18 rows remain" in n for n in task.notes
    )
    assert RunSettings(data=str(data), task="classification", drop_unlabelled=True).drop_unlabelled
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output.split())
    assert "--drop-unlabelled" in help_text and "(default: False)" in help_text


def test_one_class_data_is_refused(tmp_path, tokenizer):
    (tmp_path / "train.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"s {i}\t1\n" for i in range(20)), encoding="utf-8"
    )
    with pytest.raises(
        DataError, match="all 20 rows have label '1' in column 'label': a classifier needs at least two"
    ):
        ClassificationTask.build(str(tmp_path / "train.tsv"), tokenizer, TaskOptions(max_length=16))


def engine_on(model_dir, data, run_dir):
    config = EngineConfig(
        model=str(model_dir), data=str(data), steps=1, batch_size=4, max_length=16, eval_every=0, device="cpu"
    )
    return Engine(config, None, run_dir)


def test_a_two_label_head_and_other_data_is_said_in_spus_words(tmp_path, tiny_model_dir):
    three = tmp_path / "three.tsv"
    three.write_text("sentence\tlabel\n" + "".join(f"s {i}\t{i % 3}\n" for i in range(21)), encoding="utf-8")
    with pytest.raises(ModelLoadError) as caught:
        engine_on(tiny_model_dir, three, tmp_path / "run3")
    message = str(caught.value)
    assert "has a classification head of 2 labels ['0', '1'], and the data has 3: ['0', '1', '2']" in message
    assert "ignore_mismatched_sizes" not in message
    one = tmp_path / "one.tsv"
    one.write_text("sentence\tlabel\n" + "".join(f"s {i}\t0\n" for i in range(20)), encoding="utf-8")
    with pytest.raises(DataError, match="a classifier needs at least two classes"):
        engine_on(tiny_model_dir, one, tmp_path / "run1")
    with pytest.raises(DataError, match=re.escape("(rows 7, 14, 21)")):
        engine_on(tiny_model_dir, one_in_seven_unlabelled(tmp_path / "gaps.tsv"), tmp_path / "run-gaps")


def test_a_header_only_file_names_its_header(tmp_path, tokenizer):
    header = tmp_path / "header.tsv"
    header.write_text("sentence\tlabel\n", encoding="utf-8")
    said = f"no rows in {header} (only the header: sentence, label)"
    with pytest.raises(ValidationError, match=re.escape(said)):
        RunSettings(data=str(header))
    with pytest.raises(DataError, match=re.escape(said)):
        ClassificationTask.build(str(header), tokenizer, TaskOptions())
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValidationError, match=re.escape(f"no rows in {tmp_path / 'empty.jsonl'} (empty file)")):
        RunSettings(data=str(tmp_path / "empty.jsonl"))
