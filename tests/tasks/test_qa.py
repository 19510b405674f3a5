"""Extractive QA: window labels on the real SQuAD sample, EM / F1, and training with freezing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from spu_engine.core.data import DataError
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.qa import QATask, exact_match, f1_score, normalize_answer
from support import DATA, build_tiny

SQUAD = DATA / "squad"


@pytest.mark.parametrize("max_length,doc_stride", [(384, 128), (48, 16)])
def test_every_labelled_span_is_the_answer_or_reported_out_of_window(tokenizer, max_length, doc_stride):
    task = QATask.build(
        str(SQUAD), tokenizer, TaskOptions(max_length=max_length, doc_stride=doc_stride, eval_split=0)
    )  # every question
    assert len(task.eval_examples) == 627
    answered, inside_token = set(), []
    for feat in task.eval:
        example_index, offsets = task.eval_windows[feat["feature_index"]]
        example = task.eval_examples[example_index]
        start, end = feat["start_positions"], feat["end_positions"]
        if start == 0:
            assert end == 0
            continue
        answer_start, text = example.answers[0]
        span = example.context[offsets[start][0] : offsets[end][1]]
        answered.add(example.id)
        if normalize_answer(span) != normalize_answer(text):
            # The answer begins or ends inside a word piece ("8" of "18"): the label is the smallest covering span.
            assert offsets[start][0] <= answer_start and offsets[end][1] >= answer_start + len(text)
            assert offsets[start][0] < answer_start or offsets[end][1] > answer_start + len(text)
            inside_token.append(example.id)
    reported = set(task.out_of_window["eval"])
    assert answered | reported == {e.id for e in task.eval_examples}
    assert not answered & reported
    assert len(inside_token) <= 10  # 6 of 627 with the MiniLM word pieces
    if max_length == 384:
        assert not reported
    else:
        assert reported  # some answers are longer than a 48-token window's context
        long_window = {e.id: e for e in task.eval_examples}
        for qid in reported:  # ... and those truly fit in no window
            example = long_window[qid]
            answer_start, text = example.answers[0]
            for example_index, offsets in task.eval_windows:
                if task.eval_examples[example_index].id == example.id:
                    spans = [o for o in offsets if o is not None]
                    assert not (spans[0][0] <= answer_start and spans[-1][1] >= answer_start + len(text))


def test_long_context_gets_overlapping_windows(tokenizer):
    task = QATask.build(str(SQUAD), tokenizer, TaskOptions(max_length=64, doc_stride=20, max_eval_samples=5))
    windows = [w for w in task.eval_windows if w[0] == 0]
    assert len(windows) > 2
    first, second = ([o for o in offsets if o is not None] for _, offsets in windows[:2])
    assert first[-20:] == second[:20]  # consecutive windows share doc_stride tokens of context


def test_squad_normalisation_and_scores_match_hand_computed_values():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert exact_match("the Broncos.", "Broncos") == 1.0
    assert exact_match("Denver Broncos", "Broncos") == 0.0
    assert f1_score("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)  # P 2/3, R 1
    assert f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)  # P 1, R 1/2
    assert f1_score("Carolina", "Denver Broncos") == 0.0


class FixedSpanModel(torch.nn.Module):
    """Returns logits that point at fixed (start, end) token positions, per feature."""

    def __init__(self, spans: dict[int, tuple[int, int]]) -> None:
        super().__init__()
        self.spans = spans

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start = torch.zeros(input_ids.shape, dtype=torch.float)
        end = torch.zeros(input_ids.shape, dtype=torch.float)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            s, e = self.spans[tuple(i for i, m in zip(ids, mask) if m)]
            start[row, s], end[row, e] = 5.0, 5.0
        return SimpleNamespace(start_logits=start, end_logits=end)


def _squad_file(tmp_path, paragraphs):
    path = tmp_path / "tiny-squad.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def _token_span(task, feature, text):
    _, offsets = task.eval_windows[feature["feature_index"]]
    context = task.eval_examples[task.eval_windows[feature["feature_index"]][0]].context
    a = context.index(text)
    s = next(i for i, o in enumerate(offsets) if o and o[0] == a)
    e = next(i for i, o in enumerate(offsets) if o and o[1] == a + len(text))
    return s, e


def test_evaluate_scores_fixed_predictions(tokenizer, tmp_path):
    context1 = "The Denver Broncos won the game in Santa Clara."
    context2 = "Carolina Panthers lost the game."
    path = _squad_file(
        tmp_path,
        [
            {
                "context": context1,
                "qas": [
                    {
                        "id": "q1",
                        "question": "Who won?",
                        "answers": [
                            {"answer_start": 4, "text": "Denver Broncos"},
                            {"answer_start": 11, "text": "Broncos"},
                        ],
                    }
                ],
            },
            {
                "context": context2,
                "qas": [
                    {
                        "id": "q2",
                        "question": "Who lost?",
                        "answers": [{"answer_start": 0, "text": "Carolina Panthers"}],
                    },
                    {"id": "q3", "question": "Where?", "answers": [{"answer_start": 0, "text": "Carolina"}]},
                ],
            },
        ],
    )
    task = QATask.build(str(path), tokenizer, TaskOptions(max_length=64, eval_split=0))  # scored on its own questions
    predicted = {"q1": "Denver Broncos won", "q2": "Carolina Panthers", "q3": "lost the game"}
    spans = {}
    for feat in task.eval:
        qid = task.eval_examples[task.eval_windows[feat["feature_index"]][0]].id
        spans[tuple(feat["input_ids"])] = _token_span(task, feat, predicted[qid])
    metrics = task.evaluate(FixedSpanModel(spans), [task.collate(task.eval)])
    # q1: EM 0, F1 max(0.8 vs "Denver Broncos", 0.5 vs "Broncos") = 0.8; q2: EM 1, F1 1; q3: 0, 0
    assert metrics["exact_match"] == pytest.approx(1 / 3)  # 0-1, as every SPU score (SQuAD's script: 33.3)
    assert metrics["f1"] == pytest.approx(1.8 / 3)
    assert metrics["eval_samples"] == 3


def test_best_window_wins_across_windows(tokenizer, tmp_path):
    filler = " ".join(f"word{i}" for i in range(60))
    context = f"Alpha beta. {filler} The capital is Paris."
    path = _squad_file(
        tmp_path,
        [
            {
                "context": context,
                "qas": [
                    {
                        "id": "q",
                        "question": "Capital?",
                        "answers": [{"answer_start": context.index("Paris"), "text": "Paris"}],
                    }
                ],
            }
        ],
    )
    task = QATask.build(str(path), tokenizer, TaskOptions(max_length=48, doc_stride=8, eval_split=0))
    assert len(task.eval) > 2
    last = task.eval[-1]
    s, e = _token_span(task, last, "Paris")
    first_s, first_e = _token_span(task, task.eval[0], "Alpha")
    starts = {f["feature_index"]: torch.zeros(len(f["input_ids"])) for f in task.eval}
    ends = {k: v.clone() for k, v in starts.items()}
    starts[0][first_s], ends[0][first_e] = 1.0, 1.0  # a weak "Alpha" in the first window
    starts[last["feature_index"]][s], ends[last["feature_index"]][e] = 3.0, 3.0  # a strong "Paris" in the last
    assert task.predict(starts, ends) == {0: "Paris"}
    starts[0][first_s] = 9.0  # now the first window's span scores higher
    assert task.predict(starts, ends) == {0: "Alpha"}


def test_bad_squad_input_names_the_problem(tokenizer, tmp_path):
    path = _squad_file(
        tmp_path,
        [{"context": "abc", "qas": [{"id": "q", "question": "?", "answers": [{"answer_start": 1, "text": "zz"}]}]}],
    )
    with pytest.raises(DataError, match="answer_start 1 does not point at the answer 'zz'"):
        QATask.build(str(path), tokenizer, TaskOptions())
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"id": "q", "question": "?", "answers": []}) + "\n")
    with pytest.raises(DataError, match="has no 'context'"):
        QATask.build(str(flat), tokenizer, TaskOptions())
    with pytest.raises(DataError, match="--doc-stride must be between 1 and --max-length - 1"):
        QATask.build(str(SQUAD), tokenizer, TaskOptions(max_length=64, doc_stride=64))
    with pytest.raises(
        DataError, match="leaves 0 context tokens in a window of --max-length 16; that must be more than --doc-stride 8"
    ):
        QATask.build(str(SQUAD), tokenizer, TaskOptions(max_length=16, doc_stride=8))


def test_eval_split_holds_out_whole_articles(tokenizer):
    task = QATask.build(str(SQUAD), tokenizer, TaskOptions(max_length=384, eval_split=0.25))
    eval_titles = {e.group for e in task.eval_examples}
    assert len(eval_titles) == 12  # a quarter of the 48 articles, the last ones
    assert len(task.eval_examples) < 627
    with pytest.raises(DataError, match="--eval-split 0.001 leaves no articles for eval"):
        QATask.build(str(SQUAD), tokenizer, TaskOptions(eval_split=0.001))


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2"])
def test_qa_trains_with_frozen_prefix(tokenizer, arch):
    config = EngineConfig(
        model="tiny",
        data=str(SQUAD),
        steps=3,
        batch_size=4,
        max_length=64,
        max_train_samples=24,
        max_eval_samples=8,
        eval_every=0,
        warmup=0,
        lr=1e-3,
    )
    assert config.task == "qa"
    policy = parse_policy(
        {"freeze": [{"units": ["embeddings"], "trainable": False}, {"layers": [0], "trainable": False}]}
    )
    engine = Engine(config, policy, model=build_tiny(arch, tokenizer, "qa"), tokenizer=tokenizer)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    assert engine.run() == "finished"
    for name, p in engine.model.named_parameters():
        unit = engine.units.unit_of[name]
        if unit in ("embeddings", "block0"):
            assert not p.requires_grad and p.grad is None
            assert torch.equal(p, before[name]), name
    changed = [n for n, p in engine.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(engine.units.unit_of[n] not in ("embeddings", "block0") for n in changed)
    metrics = engine.evaluate()
    assert {"eval_loss", "exact_match", "f1"} <= metrics.keys() and 0 <= metrics["f1"] <= 1
