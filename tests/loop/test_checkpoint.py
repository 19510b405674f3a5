"""Checkpoints: atomic, verified by checksum, broken ones skipped with a message, weights never unpickled."""

from __future__ import annotations

import json
import os

import pytest
import torch

from spu_engine.storage import checkpoint as ckpt


class _Toy(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _save(folder, step, model=None, keep=5):
    model = model or _Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return ckpt.save_checkpoint(folder, step, model, opt, {"note": step}, keep=keep)


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    model = _Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, {"note": "x"})
    assert path.name == "step-0000007" and ckpt.verify(path) is None
    other = _Toy(4)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = ckpt.load_checkpoint(path, other, other_opt)
    assert state == {"note": "x", "step": 7}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: os.truncate(p / "model.safetensors", 10), "model.safetensors has 10 bytes, manifest says"),
        (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda p: (p / "manifest.json").unlink(), "no manifest (incomplete write)"),
        (lambda p: (p / "manifest.json").write_text("[1, 2"), "unreadable manifest"),
        (lambda p: (p / "manifest.json").write_text('{"files": [1]}'), "unreadable manifest"),
        (
            lambda p: (p / "manifest.json").write_text('{"files": {}}'),
            "manifest does not list model.safetensors, optimizer.pt, state.json",
        ),
        (lambda p: _flip_a_byte(p / "state.json"), "state.json checksum mismatch (corrupted)"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_with_a_message(tmp_path, damage, reason):
    good = _save(tmp_path, 5)
    bad = _save(tmp_path, 10)
    damage(bad)
    assert reason in ckpt.verify(bad)
    said: list[str] = []
    assert ckpt.latest_checkpoint(tmp_path, log=said.append) == good
    assert len(said) == 1 and said[0].startswith("skipping checkpoint step-0000010: ") and reason in said[0]
    with pytest.raises(ckpt.CheckpointError, match="not usable"):
        ckpt.read_state(bad)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))


def test_checkpoints_are_ordered_by_step_and_pruned_to_keep(tmp_path):
    for step in (9, 10, 100, 10_000_000):
        _save(tmp_path, step, keep=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000010", "step-0000100", "step-10000000"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-10000000"


def test_same_step_is_replaced_whole(tmp_path):
    first = _save(tmp_path, 3)
    model = _Toy()
    with torch.no_grad():
        model.a.weight.fill_(7.0)
    second = _save(tmp_path, 3, model=model)
    assert first == second and ckpt.verify(second) is None
    loaded = _Toy()
    ckpt.load_weights(second, loaded)
    assert torch.all(loaded.a.weight != 0) and [p.name for p in tmp_path.iterdir()] == ["step-0000003"]


def _files(folder):
    return {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}


def test_resume_moves_a_damaged_checkpoint_aside_with_the_reason_and_deletes_nothing(tmp_path):
    _save(tmp_path, 5)
    bad = _save(tmp_path, 10)
    os.truncate(bad / "model.safetensors", 100)
    (tmp_path / ".tmp-step-0000015-abc").mkdir()
    before = _files(bad)
    said: list[str] = []
    ckpt.remove_partial(tmp_path, said.append)
    assert ckpt.checkpoint_to_resume(tmp_path, log=said.append).name == "step-0000005"
    aside = tmp_path / "unusable" / "step-0000010"
    assert said[0] == "removed half-written checkpoint .tmp-step-0000015-abc"
    assert said[-1].startswith(f"moved unusable checkpoint step-0000010 to {aside}") and "(truncated)" in said[-1]
    assert {k: v for k, v in _files(aside).items() if k != "reason.txt"} == before  # every byte kept
    assert "model.safetensors has 100 bytes" in (aside / "reason.txt").read_text()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000005"]
    _save(tmp_path, 10)  # the same step written again later: the first one stays aside, under another name
    os.truncate(tmp_path / "step-0000010" / "state.json", 1)
    ckpt.checkpoint_to_resume(tmp_path, log=said.append)
    assert sorted(p.name for p in (tmp_path / "unusable").iterdir()) == ["step-0000010", "step-0000010.1"]


@pytest.mark.parametrize(
    "damage", [lambda p: (p / "optimizer.pt").unlink(), lambda p: _flip_a_byte(p / "optimizer.pt")]
)
def test_weights_without_optimizer_state_resume_only_with_the_flag(tmp_path, damage):
    _save(tmp_path, 5)
    newest = _save(tmp_path, 10)
    damage(newest)
    before = _files(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.checkpoint_to_resume(tmp_path)
    message = str(refused.value)
    assert "checkpoint step-0000010: optimizer.pt" in message and "but its weights verify" in message
    assert (
        f"spu train --resume {tmp_path.parent} --fresh-optimizer" in message and "resume from step-0000005" in message
    )
    assert _files(tmp_path) == before  # nothing moved, nothing deleted
    assert ckpt.checkpoint_to_resume(tmp_path, fresh_optimizer=True) == newest
    model = _Toy()
    ckpt.load_weights(newest, model)  # the weights it resumes from are the verified ones
    assert ckpt.read_state(newest, ignore=(ckpt.OPTIMIZER,))["step"] == 10


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint in .*nothing to resume from.*--overwrite"):
        ckpt.checkpoint_to_resume(tmp_path / "checkpoints")
    for step in (5, 10):
        os.truncate(_save(tmp_path, step) / "state.json", 3)
    with pytest.raises(ckpt.CheckpointError, match="the unusable ones are kept in .*unusable with the reason"):
        ckpt.checkpoint_to_resume(tmp_path)
    assert sorted(p.name for p in (tmp_path / "unusable").iterdir()) == ["step-0000005", "step-0000010"]


def test_a_rewrite_of_the_same_step_killed_between_its_renames_is_put_back(tmp_path):
    path = _save(tmp_path, 3)
    os.rename(
        path, tmp_path / ".old-step-0000003"
    )  # killed after setting the old copy aside, before the new one took its name
    said: list[str] = []
    ckpt.remove_partial(tmp_path, said.append)
    assert said == ["restored checkpoint step-0000003 that an interrupted rewrite had set aside"]
    assert ckpt.verify(path) is None


@pytest.mark.parametrize("writer", ["save_file", "torch.save"])
def test_a_full_disk_in_any_writer_is_a_write_error_and_the_newest_checkpoint_is_untouched(
    tmp_path, monkeypatch, writer
):
    from safetensors import SafetensorError

    from spu_engine.core.writes import WriteError

    good = _save(tmp_path, 5)
    before = _files(good)
    if writer == "save_file":  # what safetensors and torch.save really raise on a full disk

        def fail(*args, **kwargs):
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )

        monkeypatch.setattr(ckpt, "save_file", fail)
    else:

        def fail(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4608 vs 4500")

        monkeypatch.setattr(ckpt.torch, "save", fail)
    with pytest.raises(WriteError) as failed:
        _save(tmp_path, 10, keep=1)
    message = str(failed.value)
    assert message.startswith("writing checkpoint step-0000010 failed (") and " free of " in message
    assert (
        "SafetensorError: " if writer == "save_file" else "RuntimeError: [enforce fail at inline_container.cc"
    ) in message
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000005"] and _files(good) == before


def test_a_checkpoint_for_another_model_is_refused_with_a_message(tmp_path):
    path = _save(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load_weights(path, torch.nn.Linear(4, 4))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_optimizer_state_is_never_unpickled(tmp_path, monkeypatch):
    """A planted optimizer.pt with code in it is refused even when its checksum is right."""
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path, 1)
    torch.save({"state": {0: _Payload()}, "param_groups": []}, path / "optimizer.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {
        "sha256": ckpt._sha256(path / "optimizer.pt"),
        "bytes": (path / "optimizer.pt").stat().st_size,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    model = _Toy()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt holds more than tensors; refused"):
        ckpt.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    assert not (tmp_path / "pwned").exists()
