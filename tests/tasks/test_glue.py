"""Sentence pairs and GLUE metrics (F1, Matthews correlation), and `spu eval` on data a model never trained on."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.config import RunSettings
from spu_engine.core.data import DataError, data_metric, glue_task, hub_args, load_hub_splits, read_rows
from spu_engine.core.policy import Policy
from spu_engine.core.policy_files import parse_policy
from spu_engine.core.runs import run_info
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tasks import TaskOptions
from spu_engine.tasks.classification import ClassificationTask, Columns, f1_positive, matthews
from spu_engine.tools.export import export_run
from support import DATA, SST2

MRPC, COLA = DATA / "mrpc", DATA / "cola"


def tsv(path, header: str, lines: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def slice_of(source, folder, train: int = 64, dev: int = 16, skip: int = 0):
    """The first rows of a GLUE folder's files (after ``skip``), in a folder of the same name."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        lines = (source / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / name).write_text(lines[0] + "".join(lines[1 + skip : 1 + skip + rows]), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- pairs


@pytest.mark.parametrize(
    "pair",
    [
        ("sentence1", "sentence2"),
        ("question", "sentence"),
        ("#1 String", "#2 String"),
        ("question1", "question2"),
        ("premise", "hypothesis"),
    ],
)
def test_pair_columns_are_inferred_and_tokenized_as_a_pair(tmp_path, tokenizer, pair):
    a, b = pair
    tsv(
        tmp_path / "train.tsv",
        f"id\t{a}\t{b}\tlabel",
        [f"{i}\tthe cat sat\ta dog ran far away\t{i % 2}" for i in range(6)],
    )
    task = ClassificationTask.build(str(tmp_path), tokenizer, TaskOptions(max_length=32, eval_split=0))
    assert Columns.of(read_rows(tmp_path / "train.tsv"), TaskOptions(), "t").text == pair
    feat = task.train[0]
    ids, segments = feat["input_ids"], feat["token_type_ids"]
    first_sep = ids.index(tokenizer.sep_token_id)
    assert tokenizer.decode(ids[1:first_sep]) == "the cat sat"
    assert set(segments[: first_sep + 1]) == {0} and set(segments[first_sep + 1 :]) == {1}  # the two segments differ
    assert tokenizer.decode(ids[first_sep + 1 : -1]) == "a dog ran far away"


def test_text_column_names_two_columns_in_the_order_given_and_one_stays_one(tmp_path, tokenizer):
    tsv(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel", [f"first text\tsecond text\t{i % 2}" for i in range(4)])
    swapped = ClassificationTask.build(
        str(tmp_path), tokenizer, TaskOptions(text_column="sentence2, sentence1", eval_split=0)
    )
    ids = swapped.train[0]["input_ids"]
    assert tokenizer.decode(ids[1 : ids.index(tokenizer.sep_token_id)]) == "second text"
    single = ClassificationTask.build(str(tmp_path), tokenizer, TaskOptions(text_column="sentence2", eval_split=0))
    assert (
        set(single.train[0]["token_type_ids"]) == {0}
        and single.train[0]["input_ids"].count(tokenizer.sep_token_id) == 1
    )
    with pytest.raises(DataError, match=r"no column 'sentence3' \(set by --text-column\)"):
        ClassificationTask.build(str(tmp_path), tokenizer, TaskOptions(text_column="sentence1,sentence3", eval_split=0))


def test_run_settings_take_one_or_two_text_columns_and_a_metric_and_a_policy_records_them(tmp_path):
    settings = RunSettings(model="tiny", data=str(MRPC), text_column="sentence1,sentence2", metric="mcc")
    replayed = parse_policy(json.loads(json.dumps({"run": settings.model_dump()})))
    assert (replayed.run.text_column, replayed.run.metric, replayed.run.task) == (
        "sentence1,sentence2",
        "mcc",
        "classification",
    )
    assert "metric: mcc" in Policy(run=settings).to_yaml()
    for bad, message in [
        ({"text_column": "a,b,c"}, "two separated by a comma"),
        ({"text_column": "a,"}, "two separated by a comma"),
        ({"metric": "auc"}, "accuracy|f1|mcc"),
        ({"metric": "f1", "task": "lm"}, "metric: --metric f1 is for classification"),
    ]:
        with pytest.raises(ValueError, match=message):
            RunSettings(model="tiny", data=str(MRPC), **bad)


# --------------------------------------------------------------------------- GLUE names and metrics


def test_glue_names_hub_and_local_pick_glue_metrics(tmp_path):
    assert hub_args("glue/mrpc") == ("glue", "mrpc") and hub_args("imdb") == ("imdb",)
    names = {
        "glue/mrpc": "mrpc",
        "glue/cola": "cola",
        "glue/qqp": "qqp",
        "glue/rte": "rte",
        "glue/qnli": "qnli",
        "glue/sst2": "sst2",
        "glue/mnli": "mnli",
        "imdb": None,
        "super_glue/rte": None,
        str(MRPC): "mrpc",
        str(COLA): "cola",
        str(SST2): "sst2",
        str(MRPC / "dev.tsv"): "mrpc",
    }
    for folder in ("MRPC", "CoLA", "SST-2", "STS-B", "pairs"):
        (tmp_path / folder).mkdir()
        names[str(tmp_path / folder)] = {"MRPC": "mrpc", "CoLA": "cola", "SST-2": "sst2", "STS-B": "stsb"}.get(folder)
    assert {name: glue_task(name) for name in names} == names
    metrics = {
        "glue/mrpc": "f1",
        "glue/qqp": "f1",
        "glue/cola": "mcc",
        "glue/rte": "accuracy",
        "glue/sst2": "accuracy",
        str(COLA): "mcc",
        str(tmp_path / "MRPC"): "f1",
        str(tmp_path / "pairs"): "accuracy",
        "imdb": "accuracy",
    }
    assert {name: data_metric(name) for name in metrics} == metrics


def test_hub_glue_loads_its_config_and_validation_split_without_network(monkeypatch):
    import datasets

    class Split(list):
        def to_list(self):
            return list(self)

    asked = []

    def fake(*args):
        asked.append(args)
        mnli = args == ("glue", "mnli")
        return {
            "train": Split([{"premise": "a", "hypothesis": "b", "label": 1}]),
            ("validation_matched" if mnli else "validation"): Split([{"premise": "c", "hypothesis": "d", "label": 0}]),
            "test": Split([{"premise": "e", "hypothesis": "f", "label": -1}]),
        }

    monkeypatch.setattr(datasets, "load_dataset", fake)
    for name in ("glue/rte", "glue/mnli"):
        splits = load_hub_splits(name)
        assert splits["eval"] == [{"premise": "c", "hypothesis": "d", "label": 0}], (
            name
        )  # validation, never the unlabelled test
    assert asked == [("glue", "rte"), ("glue", "mnli")]


def test_mrpc_and_cola_folders_pick_f1_and_mcc_and_metric_overrides(tokenizer, tmp_path):
    def build(source, **options):
        return ClassificationTask.build(
            str(source), tokenizer, TaskOptions(max_length=32, max_train_samples=8, max_eval_samples=8, **options)
        )

    mrpc, cola, sst2 = build(MRPC), build(COLA), build(SST2)
    assert (mrpc.metric, cola.metric, sst2.metric) == ("f1", "mcc", "accuracy")
    assert mrpc.label_names == ["0", "1"] and "token_type_ids" in mrpc.train[0] and 1 in mrpc.train[0]["token_type_ids"]
    assert build(MRPC, metric="mcc").metric == "mcc" and build(COLA, metric="accuracy").metric == "accuracy"
    tsv(tmp_path / "three" / "train.tsv", "sentence\tlabel", [f"s {i}\t{i % 3}" for i in range(9)])
    with pytest.raises(DataError, match=r"--metric f1 is the F1 of the positive class and needs two labels; .* has 3"):
        build(tmp_path / "three", metric="f1", eval_split=0)
    (tmp_path / "STS-B").mkdir()
    with pytest.raises(DataError, match="STS-B: similarity scores"):
        build(tmp_path / "STS-B")


class FixedPredictions(torch.nn.Module):
    """A 'model' whose prediction for example i (its single input id) is ``predictions[i]``."""

    def __init__(self, predictions: list[int]) -> None:
        super().__init__()
        self.predictions = torch.tensor(predictions)

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot(self.predictions[input_ids[:, 0]], 2).float() * 3.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("metric", ["f1", "mcc"])
def test_f1_and_mcc_equal_the_hand_computation(metric):
    gold = [1, 1, 1, 0, 0, 1, 0, 1, 1, 0]
    pred = [1, 0, 1, 0, 1, 1, 0, 0, 1, 1]  # TP 4, FP 2, FN 2, TN 2
    task = ClassificationTask([], [], 0)
    task.name_classes({"0": 0, "1": 1}, metric, "fixed")
    batches = [{"input_ids": torch.arange(i, i + 5)[:, None], "labels": torch.tensor(gold[i : i + 5])} for i in (0, 5)]
    got = task.evaluate(FixedPredictions(pred), batches)
    tp, fp, fn, tn = 4, 2, 2, 2
    want = {
        "f1": 2 * tp / (2 * tp + fp + fn),
        "mcc": (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)),
    }[metric]
    assert got[metric] == pytest.approx(want) and want == pytest.approx({"f1": 2 / 3, "mcc": 1 / 6}[metric])
    assert got["accuracy"] == pytest.approx(0.6) and got["eval_samples"] == 10
    assert got["top_answer_share"] == pytest.approx(0.6) and got["top_answer"] == "1"  # 6 of the 10 predictions are 1
    assert set(got) == {"eval_loss", "accuracy", "top_answer_share", "top_answer", metric, "eval_samples"}


def test_degenerate_predictions_score_zero_not_nan():
    one_class = torch.tensor([[0.0, 6.0], [0.0, 4.0]]).double()  # every example predicted 1
    assert matthews(one_class) == 0.0 and f1_positive(torch.zeros(2, 2).double()) == 0.0
    assert f1_positive(one_class) == pytest.approx(2 * 4 / (10 + 4))
    three = torch.tensor([[5.0, 0, 0], [0, 4.0, 0], [0, 0, 3.0]]).double()
    assert matthews(three) == pytest.approx(1.0)


def test_the_engine_reports_the_headline_metric_in_hello_eval_and_runs(tokenizer, tmp_path):
    from support import build_tiny

    data = slice_of(COLA, tmp_path / "cola", train=32, dev=16)
    task = ClassificationTask.build(str(data), tokenizer, TaskOptions(max_length=32))
    config = EngineConfig(model="tiny", data=str(data), steps=2, batch_size=4, eval_every=1, warmup=0, device="cpu")
    engine = Engine(config, None, tmp_path / "run", model=build_tiny("bert", tokenizer), tokenizer=tokenizer, task=task)
    engine.run()
    engine.close()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["type"] == "hello")["metric"] == "mcc"
    evals = [e for e in events if e["type"] == "eval"]
    assert evals and all({"accuracy", "mcc"} <= set(e) and -1 <= e["mcc"] <= 1 for e in evals)
    info = run_info(tmp_path / "run")
    assert info.metric == "mcc" and info.metric_value == evals[-1]["mcc"]


# --------------------------------------------------------------------------- spu eval


def train_run(folder, model_dir, data, policy: Policy | None = None):
    config = EngineConfig(
        model=str(model_dir),
        data=str(data),
        steps=3,
        batch_size=4,
        max_length=48,
        eval_every=0,
        warmup=0,
        lr=1e-3,
        device="cpu",
    )
    engine = Engine(config, policy, folder)
    engine.run()
    engine.close()
    return engine


@pytest.fixture(scope="module")
def mrpc_runs(tiny_model_dir, tmp_path_factory):
    """Two finished tiny-BERT runs on a slice of MRPC (pruning masks; LoRA) and a held-out TSV neither saw."""
    root = tmp_path_factory.mktemp("glue")
    data = slice_of(MRPC, root / "mrpc")
    pruned = train_run(
        root / "pruned",
        tiny_model_dir,
        data,
        parse_policy({"pruning": {"method": "magnitude", "schedule": {"kind": "constant", "final_sparsity": 0.5}}}),
    )
    lora = train_run(root / "lora", tiny_model_dir, data, parse_policy({"peft": {"method": "lora", "r": 4}}))
    unseen = slice_of(MRPC, root / "unseen" / "mrpc", train=0, dev=24, skip=300) / "dev.tsv"
    return root, {"pruned": pruned, "lora": lora}, unseen


def expected(engine, unseen, tokenizer) -> dict:
    """The engine's own evaluate on the unseen file, with the run's label ids."""
    engine.task = ClassificationTask.scoring(
        read_rows(unseen), str(unseen), tokenizer, TaskOptions(max_length=48, metric="f1"), {"0": 0, "1": 1}
    )
    return engine.evaluate()


def eval_json(*args) -> dict:
    result = CliRunner().invoke(app, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("run", ["pruned", "lora"])
def test_spu_eval_scores_a_run_folder_as_it_trained(mrpc_runs, tokenizer, run):
    root, engines, unseen = mrpc_runs
    want = expected(engines[run], unseen, tokenizer)
    got = eval_json("--model", root / run, "--data", unseen, "--device", "cpu")
    assert (got["metric"], got["task"], got["data"]) == ("f1", "classification", str(unseen))
    assert got["checkpoint"].endswith("step-0000003") and got["value"] == got["metrics"]["f1"]
    for key in ("eval_loss", "accuracy", "f1", "eval_samples"):
        assert got["metrics"][key] == pytest.approx(want[key], abs=1e-6), key


def test_spu_eval_scores_an_exported_folder_like_its_run(mrpc_runs, tokenizer, tmp_path):
    root, engines, unseen = mrpc_runs
    export_run(root / "pruned", tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["id2label"] == {"0": "0", "1": "1"}
    want = expected(engines["pruned"], unseen, tokenizer)
    got = eval_json("--model", tmp_path / "model", "--data", unseen.parent, "--split", "dev", "--metric", "mcc")
    assert (
        got["checkpoint"] is None
        and got["metric"] == "mcc"
        and got["metrics"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
    )
    table = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "model"), "--data", str(unseen)])
    assert table.exit_code == 0, table.output
    assert "f1" in table.stdout and f"{want['f1']:.4f}" in table.stdout and "accuracy" in table.stdout


def test_spu_eval_bad_input_is_one_line(mrpc_runs, tmp_path, minilm_dir):
    root, _, unseen = mrpc_runs
    run = root / "pruned"
    tsv(tmp_path / "nolabel.tsv", "sentence1\tsentence2", ["a\tb"])
    tsv(tmp_path / "maybe.tsv", "sentence1\tsentence2\tlabel", ["a\tb\t1", "c\td\tmaybe"])
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    for checkpoint in (damaged / "checkpoints").iterdir():
        os.truncate(checkpoint / "model.safetensors", 100)
    cases = [
        (["--model", tmp_path / "missing", "--data", unseen], f"--model {tmp_path / 'missing'}: no such folder"),
        (
            ["--model", tmp_path, "--data", unseen],
            "neither a run folder (no checkpoints/) nor a model folder (no config.json)",
        ),
        (
            ["--model", damaged, "--data", unseen],
            "no checkpoint whose weights verify (step-0000003: model.safetensors has 100 bytes",
        ),
        (
            ["--model", run, "--data", tmp_path / "nolabel.tsv"],
            "nolabel.tsv: no label column (looked for label, labels, target, class, Quality",
        ),
        (
            ["--model", run, "--data", tmp_path / "maybe.tsv"],
            "maybe.tsv: row 2 has label 'maybe', not among the model's classes ['0', '1']",
        ),
        (["--model", run, "--data", unseen.parent, "--split", "test"], "has no test file (found dev.tsv, train.tsv)"),
        (
            ["--model", run, "--data", unseen, "--split", "nope.tsv"],
            "--split nope.tsv: not train, dev or test, and no such file",
        ),
        (["--model", run, "--data", unseen, "--metric", "auc"], "--metric auc: one of accuracy, f1, mcc"),
        (["--model", minilm_dir, "--data", unseen], "its config names no task head (BertModel)"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["eval", *map(str, args)])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (message, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_spu_eval_skips_a_damaged_newest_checkpoint_and_says_so(mrpc_runs, tmp_path):
    root, _engines, unseen = mrpc_runs
    run = tmp_path / "run"
    shutil.copytree(root / "pruned", run)
    older = run / "checkpoints" / "step-0000001"
    shutil.copytree(run / "checkpoints" / "step-0000003", older)  # an older complete checkpoint (same weights)
    (older / "manifest.json").write_text((older / "manifest.json").read_text().replace('"step": 3', '"step": 1'))
    os.truncate(run / "checkpoints" / "step-0000003" / "model.safetensors", 100)
    result = CliRunner().invoke(app, ["eval", "--model", str(run), "--data", str(unseen), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"].endswith("step-0000001")
    assert "scored step-0000001, the newest checkpoint whose weights verify; skipped step-0000003" in " ".join(
        result.stderr.split()
    )


def test_labels_of_older_checkpoints_and_of_models_that_name_their_classes(mrpc_runs, tmp_path):
    """A checkpoint without label names takes the run's training labels; a model naming its classes NEGATIVE/POSITIVE takes label i as class i."""
    import hashlib

    root, _, unseen = mrpc_runs
    want = eval_json("--model", root / "pruned", "--data", unseen)["metrics"]
    run = tmp_path / "old"
    shutil.copytree(root / "pruned", run)
    checkpoint = run / "checkpoints" / "step-0000003"
    state = json.loads((checkpoint / "state.json").read_text())
    del state["label_names"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / "state.json").read_bytes()
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert eval_json("--model", run, "--data", unseen)["metrics"] == want
    export_run(root / "pruned", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.update(id2label={"0": "NEGATIVE", "1": "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "model"), "--data", str(unseen), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"] == pytest.approx(want, abs=1e-5)
    assert "the model names its classes ['NEGATIVE', 'POSITIVE'], the data numbers them" in " ".join(
        result.stderr.split()
    )
