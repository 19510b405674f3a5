"""Training data stays on disk: what a task holds does not grow with the file, and a second build on the same file
loads the first one's tokenized features instead of tokenizing again (issue 28 point 3)."""

from __future__ import annotations

import json
import random
import tracemalloc

import pyarrow as pa
import pytest

from spu_engine.core.data import DataError
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask
from spu_engine.tasks.lm import LMTask
from spu_engine.tasks.sft import SftTask

WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "good",
    "bad",
    "great",
    "dull",
    "funny",
    "long",
    "short",
    "story",
    "music",
    "ending",
]


def write_rows(path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        f.write("sentence\tlabel\n")
        for _ in range(n):
            f.write(" ".join(rng.choices(WORDS, k=rng.randint(4, 20))) + f"\t{rng.randint(0, 1)}\n")


def held_bytes() -> int:
    """Memory Python and Arrow hold now (a memory-mapped file is neither)."""
    return tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()


def built_by(task_class, tokenizer, path, options):
    """The task, the memory it holds after its build and the build's peak (Python's), both over the start."""
    tracemalloc.start()
    try:
        start = held_bytes()
        task = task_class.build(str(path), tokenizer, options)
        return task, held_bytes() - start, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def counting(tokenizer, monkeypatch) -> list[int]:
    """The texts the tokenizer is called on from now on, counted into the list returned."""
    tokenized: list[int] = []
    call = type(tokenizer).__call__

    def counted(self, text, *args, **kwargs):
        tokenized.append(len(text) if isinstance(text, list) else 1)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counted)
    return tokenized


def built(tokenizer, path):
    """The classification task, the memory it holds after its build and the build's peak (Python's)."""
    return built_by(ClassificationTask, tokenizer, path, TaskOptions(max_length=32))


def test_memory_of_a_task_does_not_grow_with_its_data(tokenizer, tmp_path):
    for name, n in (("warm-up", 500), ("small", 2_000), ("large", 20_000)):
        write_rows(tmp_path / f"{name}.tsv", n)
    built(tokenizer, tmp_path / "warm-up.tsv")  # what the first build imports is not the data's
    small, small_held, small_peak = built(tokenizer, tmp_path / "small.tsv")
    large, large_held, large_peak = built(tokenizer, tmp_path / "large.tsv")
    assert (len(small.train), len(large.train)) == (1_800, 18_000)  # a tenth held out for eval
    # the rows held as Python lists took ~1.5 KB each: 27 MB more for the 18 000 more rows
    assert large_held - small_held < 2_000_000, f"held {small_held / 1e6:.1f} MB, then {large_held / 1e6:.1f} MB"
    assert large_peak - small_peak < 4_000_000, f"peaked at {small_peak / 1e6:.1f} MB, then {large_peak / 1e6:.1f} MB"
    assert large.train[17_999]["labels"] in (0, 1) and len(large.train[100:164]) == 64


def test_a_second_build_on_the_same_file_tokenizes_nothing(tokenizer, tmp_path, monkeypatch):
    write_rows(tmp_path / "train.tsv", 3_000)
    tokenized = counting(tokenizer, monkeypatch)
    options = TaskOptions(max_length=32, max_eval_samples=100)
    first = ClassificationTask.build(str(tmp_path / "train.tsv"), tokenizer, options)
    assert sum(tokenized) == 2_700 + 100
    tokenized.clear()
    second = ClassificationTask.build(str(tmp_path / "train.tsv"), tokenizer, options)
    assert sum(tokenized) == 0 and second.train == first.train and second.eval == first.eval
    other = ClassificationTask.build(str(tmp_path / "train.tsv"), tokenizer, TaskOptions(max_length=16))
    assert sum(tokenized) == 3_000 and max(len(f["input_ids"]) for f in other.train) == 16  # other options: again
    tokenized.clear()
    write_rows(tmp_path / "train.tsv", 3_000, seed=1)  # the file changed: its rows are read and tokenized again
    changed = ClassificationTask.build(str(tmp_path / "train.tsv"), tokenizer, options)
    assert sum(tokenized) == 2_800 and changed.train != first.train


def test_a_row_without_a_column_is_named(tokenizer, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        '{"text": "fine", "label": 1}\n{"label": 0}\n'
    )  # a missing label: test_labels
    with pytest.raises(DataError, match=r"train.jsonl: row 2 has no column 'text'"):
        ClassificationTask.build(str(tmp_path / "train.jsonl"), tokenizer, TaskOptions(eval_split=0))


def test_a_cache_folder_that_cannot_be_written_is_named(tokenizer, tmp_path, monkeypatch):
    import datasets

    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "a-file" / "cache")
    write_rows(tmp_path / "train.tsv", 50)
    with pytest.raises(DataError, match=r"cannot write the data cache in .*a-file/cache .*set HF_DATASETS_CACHE"):
        ClassificationTask.build(str(tmp_path / "train.tsv"), tokenizer, TaskOptions(max_length=32))


def test_hub_data_takes_the_same_path_as_a_local_file(tokenizer, tmp_path, monkeypatch):
    """A hub dataset (here one saved by ``datasets`` and memory-mapped back, as the hub's cache is) gives the
    features the same rows give from a local file, through the same tables and cache."""
    import datasets

    import spu_engine.core.data as data

    (tmp_path / "local").mkdir()
    write_rows(tmp_path / "local" / "train.tsv", 400)
    rows = data.read_rows(tmp_path / "local" / "train.tsv")
    hub = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows]}
            )
        }
    )
    hub.save_to_disk(tmp_path / "hub")
    monkeypatch.setattr(data, "load_hub", lambda name: datasets.load_from_disk(tmp_path / "hub"))
    options = TaskOptions(max_length=32, seed=2)
    from_hub = ClassificationTask.build("someone/reviews", tokenizer, options)
    local = ClassificationTask.build(str(tmp_path / "local" / "train.tsv"), tokenizer, options)
    assert from_hub.train == local.train and from_hub.eval == local.eval and from_hub.label_names == ["0", "1"]
    assert from_hub.train.dataset.cache_files  # on disk, not in memory


def write_problems(path, n: int, seed: int = 0) -> None:
    """GSM8K-shaped rows: a question and a worked answer ending in '#### N'."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 10))) + f" #### {rng.randint(0, 99)}"
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")


@pytest.mark.slow  # 12-16 s; the classification bound and every task's cache test stay in the default set
def test_sft_memory_does_not_grow_with_its_data(tokenizer, tmp_path):
    for name, n in (("warm-up", 100), ("small", 500), ("large", 4_000)):
        write_problems(tmp_path / f"{name}.jsonl", n)
    options = TaskOptions(max_length=48)
    built_by(SftTask, tokenizer, tmp_path / "warm-up.jsonl", options)
    small, small_held, small_peak = built_by(SftTask, tokenizer, tmp_path / "small.jsonl", options)
    large, large_held, large_peak = built_by(SftTask, tokenizer, tmp_path / "large.jsonl", options)
    assert (len(small.train), len(large.train)) == (450, 3_600)  # a tenth held out for eval
    # the rows and features held as Python lists took ~2 KB each: 7 MB more for the 3 500 more rows
    assert large_held - small_held < 2_000_000, f"held {small_held / 1e6:.1f} MB, then {large_held / 1e6:.1f} MB"
    assert large_peak - small_peak < 4_000_000, f"peaked at {small_peak / 1e6:.1f} MB, then {large_peak / 1e6:.1f} MB"
    assert large.train[3_599]["labels"][0] == -100 and len(large.train[100:164]) == 64


def test_a_second_sft_build_tokenizes_nothing(tokenizer, tmp_path, monkeypatch):
    write_problems(tmp_path / "train.jsonl", 600)
    tokenized = counting(tokenizer, monkeypatch)
    options = TaskOptions(max_length=48, max_eval_samples=20)
    first = SftTask.build(str(tmp_path / "train.jsonl"), tokenizer, options)
    assert sum(tokenized) == 2 * (540 + 20)  # each example's prompt and completion
    tokenized.clear()
    second = SftTask.build(str(tmp_path / "train.jsonl"), tokenizer, options)
    assert sum(tokenized) == 0 and second.train == first.train and second.eval == first.eval
    assert second.prompts == first.prompts and second.references == first.references and second.notes == first.notes
    other = SftTask.build(str(tmp_path / "train.jsonl"), tokenizer, TaskOptions(max_length=24, max_eval_samples=20))
    assert sum(tokenized) == 2 * (540 + 20) and max(len(f["input_ids"]) for f in other.train) == 24


def write_text(path, n: int, seed: int = 0) -> None:
    """Plain text, ``n`` lines of words (a blank line now and then, as in WikiText)."""
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choices(WORDS, k=rng.randint(0, 20))) + "\n" for _ in range(n)))


@pytest.mark.slow  # 12-16 s; the classification bound and every task's cache test stay in the default set
def test_lm_memory_does_not_grow_with_its_data(tokenizer, tmp_path):
    for name, n in (("warm-up", 500), ("small", 2_000), ("large", 20_000)):
        write_text(tmp_path / f"{name}.txt", n)
    options = TaskOptions(max_length=32)
    built_by(LMTask, tokenizer, tmp_path / "warm-up.txt", options)
    small, small_held, small_peak = built_by(LMTask, tokenizer, tmp_path / "small.txt", options)
    large, large_held, large_peak = built_by(LMTask, tokenizer, tmp_path / "large.txt", options)
    assert len(large.train) > 9 * len(small.train) > 0
    # the text and its token ids held as Python lists took ~1 KB a line: 18 MB more for the 18 000 more lines
    assert large_held - small_held < 2_000_000, f"held {small_held / 1e6:.1f} MB, then {large_held / 1e6:.1f} MB"
    assert large_peak - small_peak < 4_000_000, f"peaked at {small_peak / 1e6:.1f} MB, then {large_peak / 1e6:.1f} MB"
    assert len(large.train[-1]["input_ids"]) == 32 and len(large.train[100:164]) == 64


def test_a_second_lm_build_tokenizes_nothing(tokenizer, tmp_path, monkeypatch):
    write_text(tmp_path / "train.txt", 1_000)
    lines = len((tmp_path / "train.txt").read_text().splitlines())
    tokenized = counting(tokenizer, monkeypatch)
    options = TaskOptions(max_length=32, max_eval_samples=20)
    first = LMTask.build(str(tmp_path / "train.txt"), tokenizer, options)
    assert sum(tokenized) == lines  # a line at a time, once
    tokenized.clear()
    second = LMTask.build(str(tmp_path / "train.txt"), tokenizer, options)
    assert sum(tokenized) == 0 and second.train == first.train and second.eval == first.eval
    other = LMTask.build(str(tmp_path / "train.txt"), tokenizer, TaskOptions(max_length=16))
    assert sum(tokenized) == 0 and len(other.train[0]["input_ids"]) == 16  # other blocks of the same tokens
    assert [i for f in other.train[:2] for i in f["input_ids"]] == first.train[0]["input_ids"]


@pytest.mark.parametrize("task_class", [SftTask, LMTask])
def test_sft_and_lm_hub_data_take_the_same_path_as_a_local_file(tokenizer, tmp_path, monkeypatch, task_class):
    """A hub dataset's rows give the features the same rows give from a local file (SFT: question / answer;
    LM: its text column, the answers here)."""
    import datasets

    import spu_engine.core.data as data

    (tmp_path / "local").mkdir()
    write_problems(tmp_path / "local" / "train.jsonl", 300)
    rows = data.read_rows(tmp_path / "local" / "train.jsonl")
    columns = {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(tmp_path / "hub")
    monkeypatch.setattr(data, "load_hub", lambda name: datasets.load_from_disk(tmp_path / "hub"))
    options = TaskOptions(max_length=24, seed=2, text_column="answer")
    from_hub = task_class.build("someone/problems", tokenizer, options)
    local = task_class.build(str(tmp_path / "local" / "train.jsonl"), tokenizer, options)
    assert from_hub.train == local.train and from_hub.eval == local.eval and len(local.train) > 10
    assert from_hub.train.dataset.cache_files  # on disk, not in memory
