"""Local tables: folders with train/dev files, any of csv/tsv/json/jsonl, clear column errors."""

from __future__ import annotations

import json

import pytest

from spu_engine.core.data import DataError
from spu_engine.loop.batching import BatchStream
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask
from support import SST2


def test_sst2_folder(tokenizer):
    task = ClassificationTask.build(str(SST2), tokenizer, TaskOptions(max_length=32))
    assert len(task.train) == 6920 and len(task.eval) == 872
    assert task.num_labels == 2
    batch = task.collate(task.train[:4])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == [f["labels"] for f in task.train[:4]]


def test_missing_column_names_existing_columns(tokenizer):
    with pytest.raises(
        DataError, match=r"train.tsv: no column 'text' \(set by --text-column\); columns are: sentence, label"
    ):
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
    with pytest.raises(
        DataError, match=r"cannot load hub dataset 'glue/sst2'.*pass a local folder with train/dev files"
    ):
        ClassificationTask.build("glue/sst2", None, TaskOptions())


def _write_sst2_train_only(folder, rows: int = 200, bom: bool = False) -> None:
    folder.mkdir()
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[: rows + 1]
    (folder / "train.tsv").write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def test_without_a_dev_split_a_seeded_share_of_train_is_held_out_and_said(tmp_path, tokenizer):
    _write_sst2_train_only(tmp_path / "only-train")
    task = ClassificationTask.build(str(tmp_path / "only-train"), tokenizer, TaskOptions(max_length=32))
    assert (len(task.train), len(task.eval)) == (180, 20)
    train_texts = {tuple(f["input_ids"]) for f in task.train}
    assert not any(tuple(f["input_ids"]) in train_texts for f in task.eval)  # never evaluated on what it trains on
    assert task.notes == [
        f"{tmp_path / 'only-train' / 'train.tsv'} has no eval split: 20 of 200 rows, drawn with seed 0, are held out "
        "of training for evaluation (--eval-split 0.1; add a dev file to evaluate on one)"
    ]
    again = ClassificationTask.build(str(tmp_path / "only-train"), tokenizer, TaskOptions(max_length=32, seed=0))
    other = ClassificationTask.build(
        str(tmp_path / "only-train"), tokenizer, TaskOptions(max_length=32, seed=4, eval_split=0.25)
    )
    assert again.eval == task.eval and len(other.eval) == 50 and other.eval != task.eval[:50]


def test_the_engine_says_it_loudly(tmp_path, tokenizer, tiny_model_dir):
    from spu_engine.loop.engine import Engine, EngineConfig

    _write_sst2_train_only(tmp_path / "only-train")
    config = EngineConfig(model=str(tiny_model_dir), data=str(tmp_path / "only-train"), steps=1, max_length=32)
    events: list[dict] = []
    Engine(config, sinks=[lambda _line, ev: events.append(ev)])
    warning = next(e for e in events if e["type"] == "log" and e["level"] == "warning")
    assert "has no eval split: 20 of 200 rows" in warning["message"]


def test_a_utf8_bom_before_the_header_is_not_part_of_the_first_column(tmp_path, tokenizer):
    _write_sst2_train_only(tmp_path / "bom", rows=40, bom=True)
    task = ClassificationTask.build(str(tmp_path / "bom"), tokenizer, TaskOptions(max_length=32))
    assert len(task.train) + len(task.eval) == 40


def test_invisible_characters_in_column_names_are_shown(tmp_path, tokenizer):
    (tmp_path / "train.csv").write_text("sentence\u200b,label\nfine,1\nbad,0\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"no column 'sentence' \(set by --text-column\); columns are: 'sentence\\u200b', label"
    ):
        ClassificationTask.build(str(tmp_path), tokenizer, TaskOptions(text_column="sentence"))
