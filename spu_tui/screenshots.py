"""Write SVG screenshots of the real console during a real run: ``python -m spu_tui.screenshots``.

Starts an engine process (MiniLM on SST-2 by default), attaches the app
headless, lets it train until an evaluation has happened, freezes the lower
layers from the tree (so the plots show a policy-change mark), and saves
the main screen at 200x50 and 80x24 plus the system, help, controls and quit screens;
then switches LoRA on from the controls (its what-if line first) and shows its
tensors in the tree.
The engine is stopped at the end.

``--runs-of RUN --compare-with OTHER`` instead draws runs already on disk (read
only, no engine): RUN with OTHER overlaid at 120x36, the metric filter, and the
run browser over RUN's folder.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import typer

from spu_engine.core.config import EngineConfig
from spu_engine.core.policy import Policy
from spu_engine.core.runs import EVENTS, read_history
from spu_engine.core.spawn import spawn_engine
from spu_tui.app import SpuApp
from spu_tui.screens.help import HelpScreen
from spu_tui.screens.quit import QuitScreen
from spu_tui.widgets.controls import ControlsPanel
from spu_tui.widgets.unit_tree import UnitTree


async def _wait(pilot, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the run did not get there in time; give --timeout more seconds")
        await pilot.pause(0.2)


async def take(run_dir: Path, proc, out: Path, freeze_at: int, timeout: float) -> list[Path]:
    app = SpuApp(
        run_dir, engine=proc, cpu_share=1.0
    )  # no CPU budget: every frame at the fastest rate, so a pause shows the latest step
    shots: list[Path] = []

    def save(name: str) -> None:
        app.save_screenshot(filename=f"{name}.svg", path=str(out))
        shots.append(out / f"{name}.svg")

    async with app.run_test(size=(200, 50)) as pilot:
        await _wait(pilot, lambda: app.state.units and app.state.step >= freeze_at, timeout)
        await pilot.press("down", "down", "f")  # freeze embeddings, block0, block1
        await _wait(pilot, lambda: not app.commands.in_flight, timeout)
        await _wait(pilot, lambda: len(app.state.eval_steps) >= 2 and app.state.unit_stats, timeout)
        await pilot.pause(0.6)  # one frame
        save("console-200x50")
        await pilot.resize_terminal(80, 24)
        await pilot.pause(0.6)
        save("console-80x24")
        await pilot.press("6")
        await pilot.pause(0.4)
        save("system-80x24")
        await pilot.press("4")
        await pilot.pause(0.4)
        save("controls-80x24")
        # LoRA after the freeze: the what-if first, then its tensors in the tree under their blocks
        app.query_one("#peft-method").value = "lora"
        await _wait(pilot, lambda: str(app.query_one("#whatif-peft").render()).startswith("→"), timeout)
        app.query_one(ControlsPanel).scroll_to_widget(app.query_one("#sec-peft"), animate=False)
        await pilot.pause(0.4)
        save("whatif-lora-80x24")
        app.query_one("#apply-peft").press()
        await _wait(
            pilot,
            lambda: not app.commands.in_flight and any(".lora_" in row.name for row in app.query_one(UnitTree).rows),
            timeout,
        )
        await pilot.press("escape", "1", "down", "down", "down", "down", "right", "down", "down", "down")
        await pilot.pause(0.6)
        save("lora-rows-80x24")
        await pilot.press("1", "question_mark")
        await _wait(pilot, lambda: isinstance(app.screen, HelpScreen), 10)
        await pilot.pause(0.3)
        save("help-80x24")
        await pilot.press("escape", "q")
        await _wait(pilot, lambda: isinstance(app.screen, QuitScreen), 10)
        await pilot.pause(0.3)
        save("quit-80x24")
        await pilot.press("n")  # stop now
        await _wait(pilot, lambda: not app.is_running, 60)
    return shots


async def take_llm(run_dir: Path, proc, out: Path, timeout: float) -> list[Path]:
    """An SFT run on a decoder at 120x36: generations after an evaluation, then LoRA's rank 8 -> 64 in the controls
    with its what-if (trainable share and the memory a step would hold) before it is applied."""
    app = SpuApp(run_dir, engine=proc, cpu_share=1.0)
    async with app.run_test(size=(120, 36)) as pilot:
        await _wait(pilot, lambda: app.state.units and len(app.state.eval_steps) >= 1, timeout)
        await pilot.press("4")  # below 160x45 one panel beside the tree: the controls
        await pilot.pause(0.4)
        app.query_one("#peft-r").value = "64"
        await _wait(pilot, lambda: "→" in str(app.query_one("#whatif-peft").render()), timeout)
        app.query_one(ControlsPanel).scroll_to_widget(app.query_one("#apply-peft"), animate=False)  # the what-if's end
        await pilot.pause(0.6)
        app.save_screenshot(filename="llm-sft-120x36.svg", path=str(out))
        await pilot.press("q")
        await _wait(pilot, lambda: isinstance(app.screen, QuitScreen), 10)
        await pilot.press("n")
        await _wait(pilot, lambda: not app.is_running, 60)
    return [out / "llm-sft-120x36.svg"]


async def take_compare(run: Path, others: list[Path], out: Path) -> list[Path]:
    app = SpuApp(run, history=read_history(run), connect=False, compare=others, cpu_share=1.0)
    shots: list[Path] = []

    def save(name: str) -> None:
        app.save_screenshot(filename=f"{name}.svg", path=str(out))
        shots.append(out / f"{name}.svg")

    async with app.run_test(size=(120, 36)) as pilot:
        await _wait(pilot, lambda: all(c.metrics.series for c in app.compared), 30)
        await pilot.pause(1.0)
        save("compare-120x36")
        await pilot.press("slash", *"grad_norm.block*")
        await pilot.pause(0.6)
        save("metric-filter-120x36")
        await pilot.press("escape", "b")
        await pilot.pause(1.5)
        save("runs-120x36")
    return shots


def main(
    model: str = typer.Option("minilm"),
    data: str = typer.Option(str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2")),
    out: Path = typer.Option(Path("screenshots")),
    run_dir: Path = typer.Option(Path("runs") / "screenshots"),
    steps: int = typer.Option(400),
    batch_size: int = typer.Option(16),
    max_length: int = typer.Option(48),
    eval_every: int = typer.Option(10),
    freeze_at: int = typer.Option(8, help="step after which the lower layers are frozen from the tree"),
    timeout: float = typer.Option(600.0),
    runs_of: Path | None = typer.Option(
        None, help="instead: a finished run to draw with --compare-with runs overlaid, and the run browser"
    ),
    compare_with: list[Path] = typer.Option([], help="with --runs-of: a run to compare (repeat for more)"),
    llm: Path | None = typer.Option(
        None, help="instead: a causal LM folder fine-tuned with sft on --data (GSM8K) with LoRA r 8, at 120x36"
    ),
) -> None:
    """Screenshots of the console steering a real run."""
    if llm is not None:
        config = EngineConfig(
            model=str(llm), data=data, steps=steps, batch_size=8, max_length=192, eval_every=eval_every,
            generate_eval=2, max_new_tokens=16, max_train_samples=1500, max_eval_samples=24, system_every=2.0,
        )  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        proc = spawn_engine(config, Policy(peft={"method": "lora", "r": 8}), run_dir)
        try:
            for path in asyncio.run(take_llm(run_dir, proc, out, timeout)):
                typer.echo(path)
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=60)
        return
    if runs_of is not None:
        out.mkdir(parents=True, exist_ok=True)
        for path in asyncio.run(take_compare(runs_of, compare_with, out)):
            typer.echo(path)
        return
    if (run_dir / EVENTS).exists():
        raise typer.BadParameter(f"{run_dir} already holds a run; remove it or pass --run-dir", param_hint="--run-dir")
    config = EngineConfig(
        model=model,
        data=data,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        eval_every=eval_every,
        stats_every=2,
        max_train_samples=4000,
        max_eval_samples=200,
        system_every=2.0,
    )
    out.mkdir(parents=True, exist_ok=True)
    proc = spawn_engine(config, Policy(), run_dir)
    try:
        for path in asyncio.run(take(run_dir, proc, out, freeze_at, timeout)):
            typer.echo(path)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    typer.run(main)
