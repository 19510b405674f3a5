"""--task inferred from the data (and the model) when not given."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.data import DataError
from spu_engine.loop.engine import EngineConfig
from spu_engine.tasks import infer_task
from support import DATA, SST2, build_tiny


def test_local_data_decides_the_task(tmp_path):
    assert infer_task(str(DATA / "squad")) == "qa"
    assert infer_task(str(DATA / "squad" / "dev-v1.1-sample.json")) == "qa"
    assert infer_task(str(DATA / "wikitext2")) == "lm"
    assert infer_task(str(SST2)) == "classification"
    flat = tmp_path / "flat.jsonl"
    flat.write_text(
        json.dumps({"id": "1", "question": "q", "context": "c", "answers": {"text": ["c"], "answer_start": [0]}}) + "\n"
    )
    assert infer_task(str(flat)) == "qa"


def test_hub_names_decide_the_task():
    assert infer_task("squad") == "qa"
    assert infer_task("wikitext/wikitext-2-raw-v1") == "lm"
    assert infer_task("glue/sst2") == "classification"


def test_text_only_table_needs_a_decoder_or_an_explicit_task(tokenizer, tmp_path):
    table = tmp_path / "train.csv"
    table.write_text("text\nsome words\n")
    gpt2, bert = tmp_path / "gpt2", tmp_path / "bert"
    build_tiny("gpt2", tokenizer, "lm").save_pretrained(gpt2)
    build_tiny("bert", tokenizer).save_pretrained(bert)
    assert infer_task(str(table), str(gpt2)) == "lm"
    with pytest.raises(DataError, match="no label column .* pass --task classification, qa, lm or sft"):
        infer_task(str(table), str(bert))


def test_engine_config_resolves_auto_and_checks_names():
    assert EngineConfig(data=str(DATA / "squad")).task == "qa"
    assert EngineConfig(data=str(SST2)).task == "classification"
    assert EngineConfig(data=str(SST2), task="lm").task == "lm"
    with pytest.raises(ValueError, match="unknown task 'ner'; tasks are classification, qa, lm"):
        EngineConfig(task="ner")


def test_cli_reports_an_ambiguous_source_without_traceback(tmp_path):
    table = tmp_path / "train.csv"
    table.write_text("text\nsome words\n")
    result = CliRunner().invoke(
        app, ["train", "--data", str(table), "--model", "tiny", "--steps", "1", "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert "--task:" in result.output and "pass --task classification, qa, lm or sft" in result.output
    assert "Traceback" not in result.output


def test_a_bad_data_path_blames_data_and_a_named_label_column_needs_no_task(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "missing"),
            "--model",
            "tiny",
            "--steps",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2 and f"--data: data path '{tmp_path / 'missing'}' does not exist" in result.output
    assert "--task" not in result.output and not (tmp_path / "run").exists()
    table = tmp_path / "own"
    table.mkdir()
    (table / "train.tsv").write_text("txt\ty\nhello world\t1\nbad movie\t0\n")
    assert infer_task(str(table), label_column="y") == "classification"
    assert EngineConfig(data=str(table), text_column="txt", label_column="y").task == "classification"
    with pytest.raises(ValueError, match="task: cannot tell the task"):  # the column must exist to decide
        EngineConfig(data=str(table), label_column="label2")
