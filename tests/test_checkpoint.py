"""Checkpoints: atomic, verified by checksum, broken ones skipped with a message, weights never unpickled."""

from __future__ import annotations

import json
import os

import pytest
import torch

from spu_engine import checkpoint as ckpt


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
        (lambda p: (p / "manifest.json").write_text('{"files": {}}'), "manifest does not list model.safetensors, optimizer.pt, state.json"),
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


def test_leftovers_and_newer_broken_checkpoints_are_removed_on_resume(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    (tmp_path / ".tmp-step-0000015-abc").mkdir()
    said: list[str] = []
    ckpt.remove_partial(tmp_path, said.append)
    ckpt.discard_newer(tmp_path, 5, said.append)
    assert said == ["removed half-written checkpoint .tmp-step-0000015-abc", "removed unusable checkpoint step-0000010"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000005"]


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
    manifest["files"]["optimizer.pt"] = {"sha256": ckpt._sha256(path / "optimizer.pt"), "bytes": (path / "optimizer.pt").stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    model = _Toy()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt holds more than tensors; refused"):
        ckpt.load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    assert not (tmp_path / "pwned").exists()
