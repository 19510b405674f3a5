"""Local tables: folders with train/dev files, any of csv/tsv/json/jsonl, clear column errors."""

from __future__ import annotations

import json

import pytest

from conftest import SST2
from spu_engine.data import BatchStream, DataError
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask


def test_sst2_folder(tokenizer):
    task = ClassificationTask.build(str(SST2), tokenizer, TaskOptions(max_length=32))
    assert len(task.train) == 6920 and len(task.eval) == 872
    assert task.num_labels == 2
    batch = task.collate(task.train[:4])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == [f["labels"] for f in task.train[:4]]


def test_missing_column_names_existing_columns(tokenizer):
    with pytest.raises(DataError, match=r"train.tsv: no column 'text' \(set by --text-column\); columns are: sentence, label"):
        ClassificationTask.build(str(SST2), tokenizer, TaskOptions(text_column="text"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_other_formats_and_string_labels(tmp_path, tokenizer, fmt):
    rows = [{"review": f"text {i}", "stars": "good" if i % 2 else "bad"} for i in range(10)]
    path = tmp_path / f"train.{fmt}"
    if fmt == "csv":
        path.write_text("review,stars\n" + "".join(f"{r['review']},{r['stars']}\n" for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    task = ClassificationTask.build(str(tmp_path), tokenizer, TaskOptions(text_column="review", label_column="stars"))
    assert task.label_names == ["bad", "good"] and {f["labels"] for f in task.train} == {0, 1}


def test_folder_without_train_file(tmp_path, tokenizer):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="has no train file"):
        ClassificationTask.build(str(tmp_path), tokenizer, TaskOptions())


def test_batch_stream_resumes_exactly():
    a = BatchStream(10, seed=3)
    first = a.take(7)
    b = BatchStream(10, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.take(25) == b.take(25)
    assert sorted(first + BatchStream(10, seed=3).take(10)[7:]) == list(range(10))


def test_unreachable_hub_dataset_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load hub dataset 'glue/sst2'.*pass a local folder with train/dev files"):
        ClassificationTask.build("glue/sst2", None, TaskOptions())
