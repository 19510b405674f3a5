"""Supervised fine-tuning data: each shape rendered and masked by hand, inference of the task, truncation and
dropping, the plain template for a tokenizer without one, and bad data in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sft_support import SHAPES, write_jsonl
from spu_engine.core.data import DataError, hub_args
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions, TaskUnclear, infer_task
from spu_engine.tasks.sft import SftTask
from spu_engine.tasks.sft_render import PLAIN_TEMPLATE
from support import DATA, build_tiny

ONE_FILE = TaskOptions(max_length=64, eval_split=0)  # train and eval on the same three rows


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prompt_tokens_are_masked_and_completion_tokens_are_labels(chat_tokenizer, shape_files, shape):
    task = SftTask.build(str(shape_files[shape]), chat_tokenizer, ONE_FILE)
    sep = chat_tokenizer.sep_token_id  # the MiniLM vocabulary has no EOS: SEP ends a completion
    assert len(task.train) == 3 and task.eval == task.train
    for i, (feature, (_, prompt, completion)) in enumerate(zip(task.train, SHAPES[shape])):
        prompt_ids = ids(chat_tokenizer, prompt + "<assistant> ")  # the template's generation prompt
        assert task.prompts[i] == prompt_ids  # what a generation starts from
        completion_ids = [*ids(chat_tokenizer, completion + " "), sep]
        assert feature["input_ids"] == prompt_ids + completion_ids
        assert feature["labels"] == [-100] * len(prompt_ids) + completion_ids
        assert feature["attention_mask"] == [1] * len(feature["input_ids"])
        trained = [t for t in feature["labels"] if t != -100]
        assert chat_tokenizer.decode(trained, skip_special_tokens=True) == chat_tokenizer.decode(
            ids(chat_tokenizer, completion)
        )
    assert task.references == [completion for _, _, completion in SHAPES[shape]]


def test_the_loss_counts_completion_tokens_only(chat_tokenizer, shape_files):
    task = SftTask.build(str(shape_files["question/answer"]), chat_tokenizer, ONE_FILE)
    model = build_tiny("llama", chat_tokenizer, "lm").eval()
    batch = task.collate(task.train)
    with torch.no_grad():
        per_sample = task.per_sample_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row, feature in enumerate(task.train):
        start = feature["labels"].index(next(t for t in feature["labels"] if t != -100))
        targets = torch.tensor(feature["input_ids"][start:])  # each completion token, predicted by the one before
        by_hand = F.cross_entropy(logits[row, start - 1 : len(feature["input_ids"]) - 1], targets)
        assert per_sample[row].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_the_task_is_inferred_from_each_shape_with_a_causal_lm(shape_files, llama_dir, tiny_model_dir, tmp_path):
    for shape, path in shape_files.items():
        assert infer_task(str(path), str(llama_dir)) == "sft", shape
        assert EngineConfig(data=str(path), model=str(llama_dir)).task == "sft"
    assert infer_task(str(DATA / "gsm8k"), str(llama_dir)) == "sft"
    assert infer_task("openai/gsm8k/main", str(llama_dir)) == "sft" and hub_args("openai/gsm8k/main") == (
        "openai/gsm8k",
        "main",
    )
    assert (
        infer_task("openai/gsm8k/main", str(tiny_model_dir)) == "classification"
    )  # by name, as before, for an encoder
    assert infer_task(str(DATA / "squad"), str(llama_dir)) == "qa"  # SQuAD, even with a causal LM
    with_context = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "context": "c", "answer": "a"}])
    assert infer_task(str(with_context), str(llama_dir)) != "sft"  # a context: extractive QA's data, never sft
    with pytest.raises(
        TaskUnclear, match=r"supervised fine-tuning data \(question/answer columns\), which needs a causal LM"
    ):
        infer_task(str(shape_files["question/answer"]), str(tiny_model_dir))  # an encoder
    other = write_jsonl(tmp_path / "own.jsonl", [{"problem": "p", "solution": "s"}])
    assert infer_task(str(other), str(tiny_model_dir), prompt_column="problem") == "sft"
    config = EngineConfig(data=str(other), model=str(llama_dir), prompt_column="problem", completion_column="solution")
    assert config.task == "sft"
    with pytest.raises(ValueError, match="generate_eval: --generate-eval is for supervised fine-tuning"):
        EngineConfig(data=str(DATA / "sst2"), generate_eval=4)


def test_named_columns_and_bad_rows_are_one_line_errors(chat_tokenizer, tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", [{"problem": "two and two", "solution": "four"}] * 3)
    named = TaskOptions(max_length=64, eval_split=0, prompt_column="problem", completion_column="solution")
    task = SftTask.build(str(own), chat_tokenizer, named)
    assert chat_tokenizer.decode([t for t in task.train[0]["labels"] if t != -100], skip_special_tokens=True) == "four"
    with pytest.raises(
        DataError, match=r"not supervised fine-tuning data: .*\(columns: problem, solution\); name them"
    ):
        SftTask.build(str(own), chat_tokenizer, ONE_FILE)
    with pytest.raises(
        DataError, match=r"no column 'answer' \(set by --completion-column\); columns are: problem, solution"
    ):
        SftTask.build(
            str(own), chat_tokenizer, TaskOptions(eval_split=0, prompt_column="problem", completion_column="answer")
        )
    ends_with_user = write_jsonl(tmp_path / "user.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="row 1: the conversation in 'messages' must end with an assistant turn"):
        SftTask.build(str(ends_with_user), chat_tokenizer, ONE_FILE)
    bad_role = write_jsonl(
        tmp_path / "role.jsonl",
        [{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
    )
    with pytest.raises(DataError, match="message 1 has the role 'bot'; roles are system, user, assistant"):
        SftTask.build(str(bad_role), chat_tokenizer, ONE_FILE)


def test_truncation_keeps_prompts_whole_and_counts_cut_and_dropped(chat_tokenizer, tmp_path):
    rows = [
        {"question": "short question", "answer": "a fairly long answer " * 8},  # cut: its completion's end
        {"question": "tell me " * 30, "answer": "too late"},  # dropped: the prompt alone fills max_length
        {"question": "empty answer", "answer": ""},  # dropped: nothing to train on
        {"question": "fits", "answer": "#### 1"},
        {"question": "also fits", "answer": "#### 2"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    task = SftTask.build(str(path), chat_tokenizer, TaskOptions(max_length=24, eval_split=0))
    assert len(task.train) == 3
    for feature, row in zip(task.train, [rows[0], rows[3], rows[4]]):
        prompt_ids = ids(chat_tokenizer, f"<user> {row['question']} <assistant> ")
        assert feature["input_ids"][: len(prompt_ids)] == prompt_ids  # the whole prompt
        assert feature["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert len(feature["input_ids"]) <= 24 and any(t != -100 for t in feature["labels"])
    assert len(task.train[0]["input_ids"]) == 24
    said = " ".join(task.notes)
    assert (
        "1 of 5 train examples are longer than --max-length 24: their completions' ends are cut (prompts kept whole)"
        in said
    )
    assert "1 of 5 train examples dropped: the prompt alone fills --max-length 24 tokens" in said
    assert "1 of 5 train examples dropped: their completion is empty" in said
    nothing_left = write_jsonl(tmp_path / "nothing.jsonl", rows[1:3])
    with pytest.raises(
        DataError, match=r"no train example left: .*prompt alone fills --max-length 24.*; raise --max-length"
    ):
        SftTask.build(str(nothing_left), chat_tokenizer, TaskOptions(max_length=24, eval_split=0))


def test_a_tokenizer_without_a_chat_template_gets_the_plain_one_said_once(tokenizer, shape_files, tmp_path):
    assert tokenizer.chat_template is None
    task = SftTask.build(str(shape_files["question/answer"]), tokenizer, ONE_FILE)
    plain = [n for n in task.notes if "has no chat template" in n]
    assert len(plain) == 1 and "'### User:' and '### Assistant:'" in plain[0]
    first = task.train[1]
    prompt = ids(tokenizer, "### User:\nhow many legs has a cat?\n\n### Assistant:\n")
    assert first["input_ids"] == prompt + ids(tokenizer, "#### 4") + [tokenizer.sep_token_id]
    assert first["labels"][: len(prompt)] == [-100] * len(prompt)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        tokenize=False,
        chat_template=PLAIN_TEMPLATE,
    )
    assert rendered == "### User:\nq\n\n### Assistant:\na"
    # the engine says it once in the run's log, however often it evaluates
    folder = tmp_path / "plain-llama"
    build_tiny("llama", tokenizer, "lm").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    events: list[dict] = []
    config = EngineConfig(
        model=str(folder), data=str(shape_files["question/answer"]), steps=2, batch_size=2, eval_every=1, eval_split=0
    )
    assert config.task == "sft"
    engine = Engine(config, None, sinks=[lambda _line, ev: events.append(ev)])
    assert engine.run() == "finished"
    said = [e for e in events if e["type"] == "log" and "has no chat template" in e["message"]]
    assert len(said) == 1 and said[0]["level"] == "warning"


def test_a_template_that_cannot_split_prompt_from_completion_is_refused(chat_tokenizer, shape_files):
    odd = copy.deepcopy(chat_tokenizer)
    odd.chat_template = (  # the generation prompt says <bot>, an assistant turn <assistant>: no common start
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<bot> {% endif %}"
    )
    with pytest.raises(
        DataError, match="row 1: the chat template does not render the prompt .* as the start of the whole"
    ):
        SftTask.build(str(shape_files["question/answer"]), odd, ONE_FILE)
    odd.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turn') }}{% endif %}x"
    with pytest.raises(DataError, match="row 2: the chat template cannot render this conversation: no system turn"):
        SftTask.build(str(shape_files["messages"]), odd, ONE_FILE)
