"""A policy or data path that is not a plain file (a FIFO, a device, a folder) is refused in one line before any
read: a FIFO with no writer would block the read forever."""

from __future__ import annotations

import os
import threading

import pytest
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.data import DataError, split_files


def _within(seconds: float, call):
    """``call()``'s result, or a failure when it has not returned in ``seconds`` (a blocked read of a FIFO)."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", call()), daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), box.get("result")


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "policy.yaml"
    os.mkfifo(path)
    yield path
    try:  # a reader still blocked in open() (the old code) is let go
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_policy_validate_refuses_a_fifo_at_once(fifo):
    blocked, result = _within(20, lambda: CliRunner().invoke(app, ["policy", "validate", str(fifo)]))
    assert not blocked, "spu policy validate blocked on a FIFO"
    assert result.exit_code == 2
    assert f"{fifo}: not a policy file: it is a FIFO (named pipe); pass a YAML file" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("path, kind", [("/dev/null", "a character device"), (".", "a folder")])
def test_policy_validate_refuses_a_device_and_a_folder(path, kind):
    result = CliRunner().invoke(app, ["policy", "validate", path])
    assert result.exit_code == 2 and f"{path}: not a policy file: it is {kind}" in result.output


def test_a_fifo_as_data_is_a_data_error(tmp_path):
    path = tmp_path / "train.tsv"
    os.mkfifo(path)
    with pytest.raises(DataError, match=r"is a FIFO \(named pipe\); pass a data file or a folder of them"):
        split_files(str(path))
