"""`spu ablate`: a run's adapters removed block by block (and span by span) at evaluation time, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from spu_engine.cli import app
from spu_engine.core.policy_files import parse_policy
from spu_engine.loop.engine import Engine, EngineConfig
from spu_engine.tools.ablation import adapters_by_block, adapters_off, engine_for_run
from support import DATA, SST2


def finished_run(model_dir, tmp_path, policy: dict, data=SST2):
    config = EngineConfig(
        model=str(model_dir),
        data=str(data),
        task="classification",
        steps=3,
        batch_size=4,
        max_length=32,
        max_train_samples=64,
        max_eval_samples=24,
        eval_every=0,
        warmup=0,
        lr=1e-2,
    )
    run_dir = tmp_path / "run"
    engine = Engine(config, parse_policy(policy), run_dir)
    engine.run()
    engine.close()
    return run_dir


@pytest.fixture
def adapter_run(tiny_model_dir, tmp_path):
    return finished_run(tiny_model_dir, tmp_path, {"peft": {"method": "adapter", "size": 8}})


def test_removing_a_blocks_adapters_is_the_block_without_them(adapter_run):
    """Off means the sublayer output passes through: the same as an adapter whose up-projection is zero."""
    engine = engine_for_run(adapter_run)
    model = engine.model.eval()
    assert sorted(adapters_by_block(model)) == [0, 1, 2, 3] and all(
        len(a) == 2 for a in adapters_by_block(model).values()
    )
    batch = {"input_ids": torch.randint(5, 1000, (2, 12))}
    with torch.no_grad():
        trained = model(**batch).logits
        with adapters_off(model, [1, 2]):
            ablated = model(**batch).logits
        assert torch.equal(model(**batch).logits, trained)  # back on afterwards
        for i in (1, 2):
            for adapter in adapters_by_block(model)[i]:
                adapter.up.weight.zero_()
                adapter.up.bias.zero_()
        assert torch.allclose(model(**batch).logits, ablated, atol=1e-6)
    assert not torch.allclose(ablated, trained, atol=1e-4)


def test_spu_ablate_prints_every_block_and_span_and_writes_nothing(adapter_run):
    before = {p: p.stat().st_mtime_ns for p in adapter_run.rglob("*")}
    result = CliRunner().invoke(app, ["ablate", "--run", str(adapter_run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    spans = {(s["first"], s["last"]) for s in report["spans"]}
    assert spans == {(f, last) for f in range(4) for last in range(f, 4)}  # 10 spans of 4 blocks
    assert report["metric"] == "accuracy" and 0.0 <= report["baseline"] <= 1.0
    assert all(s["drop"] == pytest.approx(report["baseline"] - s["value"]) for s in report["spans"])
    assert {p: p.stat().st_mtime_ns for p in adapter_run.rglob("*")} == before

    table = CliRunner().invoke(app, ["ablate", "--run", str(adapter_run), "--blocks", "1-2"])
    assert table.exit_code == 0, table.output
    assert "blocks 1-2" in table.output and "block 3" not in table.output and "drop in accuracy" in table.output
    singles = CliRunner().invoke(app, ["ablate", "--run", str(adapter_run), "--singles", "--json"])
    assert len(json.loads(singles.output)["spans"]) == 4


@pytest.mark.parametrize(
    "blocks, message",
    [("7", "block(s) 7 have no adapters; blocks with adapters: 0-3"), ("2-x", "'2-x' is not a block index")],
)
def test_bad_blocks_are_named(adapter_run, blocks, message):
    result = CliRunner().invoke(app, ["ablate", "--run", str(adapter_run), "--blocks", blocks])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_run_without_adapters_or_checkpoint_is_told_so(tiny_model_dir, tmp_path):
    plain = finished_run(tiny_model_dir, tmp_path, {})
    result = CliRunner().invoke(app, ["ablate", "--run", str(plain)])
    assert result.exit_code == 2 and "no Houlsby adapters" in result.output
    for checkpoint in (plain / "checkpoints").iterdir():
        for f in checkpoint.iterdir():
            f.unlink()
        checkpoint.rmdir()
    result = CliRunner().invoke(app, ["ablate", "--run", str(plain)])
    assert result.exit_code == 2 and "holds no checkpoint yet" in result.output
    result = CliRunner().invoke(app, ["ablate", "--run", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a run folder" in result.output


@pytest.mark.process  # the console runs `spu ablate` as a process
async def test_the_console_shows_the_ablation_of_a_finished_run(adapter_run):
    """`a` on a finished adapter run: the ablation runs in its own process and its heat map opens over the run."""
    from spu_engine.core.runs import read_history
    from spu_tui.app import SpuApp
    from spu_tui.screens.ablation import AblationScreen

    app = SpuApp(adapter_run, history=read_history(adapter_run), connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("a")
        for _ in range(600):
            await pilot.pause(0.1)
            if isinstance(app.screen, AblationScreen):
                break
        assert isinstance(app.screen, AblationScreen)
        assert len(app.screen.report["spans"]) == 10
        for _ in range(50):  # pushed is not yet painted: on a loaded machine the first frame can come a while later
            await pilot.pause(0.1)
            drawn = app.export_screenshot()
            if "removed" in drawn:
                break
        assert "removed" in drawn and "drop" in drawn  # the table and the heat map, drawn
        await pilot.press("escape")
        assert not isinstance(app.screen, AblationScreen)


async def test_the_console_says_why_not_without_adapters(tiny_model_dir, tmp_path):
    from spu_engine.core.runs import read_history
    from spu_tui.app import SpuApp

    plain = finished_run(tiny_model_dir, tmp_path, {})
    app = SpuApp(plain, history=read_history(plain), connect=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("a")
        await pilot.pause(0.2)
        assert any("this run has none (peft.method: none)" in line.text for line in app.state.log)


def test_the_ablation_reports_the_tasks_own_metric(tiny_model_dir, tmp_path):
    """MRPC is scored by F1, so its ablation is too."""
    run = finished_run(tiny_model_dir, tmp_path, {"peft": {"method": "adapter", "size": 8}}, data=DATA / "mrpc")
    result = CliRunner().invoke(app, ["ablate", "--run", str(run), "--singles", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metric"] == "f1"


async def test_a_paused_runs_ablation_starts_when_the_engine_says_its_checkpoint_is_written(tmp_path, monkeypatch):
    """`a` on a paused run asks for a checkpoint; the ablation starts on the engine's checkpoint event, not before."""
    import spu_tui.screens.run as run_screen
    from spu_tui.app import SpuApp
    from spu_tui.link import Inbox
    from spu_tui.screens.ablation import AblationFailed

    started = []

    def ablate(run_dir):
        started.append(run_dir)
        raise AblationFailed("measured elsewhere")

    monkeypatch.setattr(run_screen, "ablate", ablate)

    class ScriptedLink:
        connected = True

        def __init__(self) -> None:
            self.sent, self.inbox = [], None

        def connect(self, target, timeout: float = 60.0) -> None:
            self.inbox = Inbox(target)

        def send(self, cmd: str, **fields) -> str:
            self.sent.append((cmd, fields))
            return f"c{len(self.sent)}"

        def drain(self) -> list[dict]:
            return self.inbox.drain() if self.inbox is not None else []

        def close(self) -> None:
            pass

    link = ScriptedLink()
    app = SpuApp(tmp_path, history=[], link=link)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.2)
        hello = {
            "type": "hello",
            "t": 1.0,
            "run": "r",
            "run_dir": str(tmp_path),
            "state": "paused",
            "step": 5,
            "current": {"peft": {"method": "adapter"}},
        }
        link.inbox.put(hello)
        await pilot.pause(0.2)
        await pilot.press("a")
        await pilot.pause(0.5)
        assert link.sent == [("checkpoint", {})] and started == []
        link.inbox.put({"type": "checkpoint", "t": 2.0, "step": 5, "path": "checkpoints/step5"})
        for _ in range(50):
            await pilot.pause(0.1)
            if any("ablate: measured elsewhere" in line.text for line in app.state.log):
                break
        assert started == [tmp_path]
        assert any("ablate: measured elsewhere" in line.text for line in app.state.log)
