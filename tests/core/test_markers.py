"""The ``process`` marker is kept honest: an unmarked test that starts an engine process fails (conftest's guard)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import starts_an_engine


def test_the_guard_knows_an_engine_from_other_processes():
    assert starts_an_engine([sys.executable, "-m", "spu_engine.cli", "engine", "--run-dir", "x"])
    assert starts_an_engine(["torchrun", "--nproc-per-node", "2", "train.py"])
    assert not starts_an_engine([sys.executable, "-c", "import spu_engine.core.policy"])


def test_an_unmarked_test_that_starts_an_engine_fails_naming_the_marker():
    with pytest.raises(AssertionError, match="mark it @pytest.mark.process"):
        subprocess.Popen([sys.executable, "-m", "spu_engine.cli", "--help"])
