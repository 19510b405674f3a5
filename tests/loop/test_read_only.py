"""A run folder that cannot be written (a read-only file system, no permission) is said as that, with what to do,
never as a full disk to free space on."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from spu_engine.core.protocol import ResumeCmd
from spu_engine.core.writes import FREE_SPACE, WriteError, atomic_write_text


@pytest.mark.parametrize(
    "code, said", [(errno.EROFS, "read-only"), (errno.EACCES, "not writable"), (errno.EPERM, "not writable")]
)
def test_a_refused_write_names_the_folder_not_the_free_space(tmp_path, monkeypatch, code, said):
    import tempfile

    def refuse(*_args, **_kwargs):
        raise OSError(code, errno.errorcode[code])

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError) as caught:
        atomic_write_text(tmp_path / "policy.yaml", "x")
    assert f"writing policy.yaml failed ({type(OSError(code, '')).__name__}: [Errno {code}]" in str(caught.value)
    assert str(caught.value).endswith(f"; the run folder is {said}: {tmp_path}") and " free of " not in str(
        caught.value
    )
    assert caught.value.remedy == f"make {tmp_path} writable"


def test_a_full_disk_still_says_the_free_space(tmp_path, monkeypatch):
    import tempfile

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(WriteError) as caught:
        atomic_write_text(tmp_path / "policy.yaml", "x")
    assert " free of " in str(caught.value) and caught.value.remedy == FREE_SPACE


def test_a_read_only_checkpoint_folder_pauses_saying_so_and_resumes_once_writable(make_engine, tmp_path, monkeypatch):
    from spu_engine.storage import checkpoint as ckpt

    run = tmp_path / "run"
    engine = make_engine(steps=4, run_dir=run, checkpoint_every=2, eval_every=4)
    events: list[dict] = []
    engine.sinks.append(lambda _line, ev: events.append(ev))
    real = ckpt.tempfile.mkdtemp
    read_only = {"on": True}

    def mkdtemp(*args, **kwargs):
        if read_only["on"]:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt.tempfile, "mkdtemp", mkdtemp)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(state=engine.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(e["type"] == "state" and e["state"] == "paused" for e in events):
        assert time.monotonic() < deadline, "never paused"
        time.sleep(0.02)
    paused = next(e for e in events if e["type"] == "state" and e["state"] == "paused")
    folder = run / "checkpoints"
    assert (
        f"writing checkpoint step-0000002 failed (OSError: [Errno {errno.EROFS}] Read-only file system)"
        in (paused["message"])
    )
    assert f"the run folder is read-only: {folder}" in paused["message"]
    assert f"make {folder} writable, then press s (or resume) to retry" in paused["message"]
    assert "free space" not in paused["message"] and " free of " not in paused["message"]
    read_only["on"] = False
    engine.submit(ResumeCmd(cmd="resume"))
    thread.join(60)
    assert result["state"] == "finished"
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4]


def test_a_sharded_checkpoint_on_a_read_only_folder_says_so_on_every_rank(tmp_path, monkeypatch):
    """The many-rank writer carries the remedy across ranks too (a broadcast message, not a full disk's)."""
    import torch

    from spu_engine.storage import sharded_checkpoint

    class OneRank:  # the collectives of a world of one: what rank 0 broadcasts is what every rank gets
        is_main = True

        def broadcast(self, value):
            return value

        def barrier(self):
            pass

    def refuse(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", refuse)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(WriteError) as caught:
        sharded_checkpoint.save_sharded(tmp_path, 3, model, optimizer, {}, 2, {}, OneRank())
    assert "the run folder is read-only" in str(caught.value) and " free of " not in str(caught.value)
    assert caught.value.remedy == f"make {tmp_path} writable"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the half-written folder is gone
