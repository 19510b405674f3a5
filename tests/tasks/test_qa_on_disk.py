"""SQuAD data stays on disk too: what the QA task holds does not grow with the file, a second build loads the first
one's windows, and a hub dataset takes the same path (issue 28 point 3)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_data_on_disk import WORDS, built_by, counting

from spu_engine.core.data import DataError
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.qa import QATask


def write_squad(path, questions: int, seed: int = 0) -> None:
    """A nested SQuAD v1.1 file: articles of paragraphs, two questions a paragraph, each answer a word of it."""
    rng = random.Random(seed)
    articles = []
    for a in range(questions // 10):
        paragraphs = []
        for _ in range(5):
            context = " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))
            qas = []
            for q in range(2):
                word = rng.choice(context.split())
                qas.append(
                    {
                        "id": f"{a}-{len(paragraphs)}-{q}",
                        "question": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))) + "?",
                        "answers": [{"text": word, "answer_start": context.index(word)}],
                    }
                )
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": articles}))


@pytest.mark.slow  # 12 s; the classification bound and every task's cache test stay in the default set
def test_qa_memory_does_not_grow_with_its_data(tokenizer, tmp_path):
    for name, n in (("warm-up", 100), ("small", 200), ("large", 2_000)):
        write_squad(tmp_path / f"{name}.json", n)
    options = TaskOptions(max_length=32, doc_stride=8)  # most contexts take several windows
    built_by(QATask, tokenizer, tmp_path / "warm-up.json", options)
    small, small_held, small_peak = built_by(QATask, tokenizer, tmp_path / "small.json", options)
    large, large_held, large_peak = built_by(QATask, tokenizer, tmp_path / "large.json", options)
    assert len(large.train) > 9 * len(small.train) > 0 and len(large.eval_examples) == 200  # a tenth of the articles
    # the questions and their windows held as Python lists took ~3 KB a question: 5 MB more for 1 800 more
    assert large_held - small_held < 2_000_000, f"held {small_held / 1e6:.1f} MB, then {large_held / 1e6:.1f} MB"
    # the JSON file is parsed whole once, when its table is written (a SQuAD file is one JSON document)
    assert large_peak - small_peak < 12_000_000, f"peaked at {small_peak / 1e6:.1f} MB, then {large_peak / 1e6:.1f} MB"
    assert len(large.train[-1]["input_ids"]) <= 32 and len(large.train[100:164]) == 64


def test_a_second_qa_build_tokenizes_nothing_and_scores_alike(tokenizer, tmp_path, monkeypatch):
    write_squad(tmp_path / "train.json", 300)
    options = TaskOptions(max_length=32, doc_stride=8)
    tokenized = counting(tokenizer, monkeypatch)
    first = QATask.build(str(tmp_path / "train.json"), tokenizer, options)
    assert sum(tokenized) > 0
    tokenized.clear()
    second = QATask.build(str(tmp_path / "train.json"), tokenizer, options)
    assert sum(tokenized) == 0 and second.train == first.train and second.eval == first.eval
    assert second.out_of_window == first.out_of_window and list(second.eval_windows) == list(first.eval_windows)
    starts = {f["feature_index"]: torch.randn(len(f["input_ids"])) for f in first.eval}
    ends = {i: torch.randn(len(s)) for i, s in starts.items()}
    assert first.predict(starts, ends) == second.predict(starts, ends) and len(first.predict(starts, ends)) == 30
    write_squad(tmp_path / "train.json", 300, seed=1)  # the file changed: read and cut into windows again
    changed = QATask.build(str(tmp_path / "train.json"), tokenizer, options)
    assert sum(tokenized) > 0 and changed.train != first.train


def test_qa_hub_data_takes_the_same_path_as_a_local_file(tokenizer, tmp_path, monkeypatch):
    """The hub's SQuAD columns (answers as {text: [...], answer_start: [...]}) give the windows a local file gives."""
    import datasets

    import spu_engine.core.data as data

    write_squad(tmp_path / "train.json", 200)
    articles = json.loads((tmp_path / "train.json").read_text())["data"]
    rows = [
        {
            "id": qa["id"],
            "title": article["title"],
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": {
                "text": [a["text"] for a in qa["answers"]],
                "answer_start": [a["answer_start"] for a in qa["answers"]],
            },
        }
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "hub")
    monkeypatch.setattr(data, "load_hub", lambda name: datasets.load_from_disk(tmp_path / "hub"))
    options = TaskOptions(max_length=32, doc_stride=8)
    from_hub = QATask.build("someone/squad", tokenizer, options)
    local = QATask.build(str(tmp_path / "train.json"), tokenizer, options)
    assert from_hub.train == local.train and from_hub.eval == local.eval and len(local.train) > 100
    assert list(from_hub.eval_examples) == list(local.eval_examples)
    assert from_hub.train.dataset.cache_files  # on disk, not in memory


def test_a_bad_question_is_named_from_the_hub_as_from_a_file(tokenizer, tmp_path, monkeypatch):
    import datasets

    import spu_engine.core.data as data

    rows = [
        {
            "id": "q1",
            "context": "Paris is big.",
            "question": "Which?",
            "answers": {"text": ["Rome"], "answer_start": [0]},
        }
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "hub")
    monkeypatch.setattr(data, "load_hub", lambda name: datasets.load_from_disk(tmp_path / "hub"))
    with pytest.raises(DataError, match=r"someone/squad \(train\): question 1 \(q1\): answer_start 0 does not point"):
        QATask.build("someone/squad", tokenizer, TaskOptions(eval_split=0))


def test_questions_whose_answer_fits_no_window_are_said(tokenizer, tmp_path):
    context = " ".join(["word"] * 30) + " a very long answer of many many words that no window holds whole here"
    answer = "a very long answer of many many words that no window holds whole"
    qa = {"id": "long", "question": "What?", "answers": [{"text": answer, "answer_start": context.index(answer)}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [qa]}]}]}))
    task = QATask.build(str(path), tokenizer, TaskOptions(max_length=16, doc_stride=4, eval_split=0))
    assert task.out_of_window == {"train": ["long"], "eval": ["long"]}
    note = next(n for n in task.notes if "no window" in n)
    assert "1 of 1 train questions (long) have an answer that no window of --max-length 16 tokens holds whole" in note
