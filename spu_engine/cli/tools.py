"""The ``spu`` commands around runs: runs (list them), ablate, report, export and eval."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from pydantic import ValidationError

from spu_engine.cli.app import app
from spu_engine.core.model_source import ModelLoadError
from spu_engine.core.policy import FreezeRule, PolicyError
from spu_engine.core.run_setup import LABEL_COLUMN_HELP, TEXT_COLUMN_HELP, err, fail, out, read_run_config
from spu_engine.core.validation import error_text

RUN_STATE_STYLE = {"live": "bold green", "finished": "blue", "stopped": "yellow", "error": "red", "crashed": "bold red"}


RUN_COLUMNS = ("run", "state", "step", "loss", "eval", "methods", "last event", "note")


def _run_row(info, methods: str) -> list[str]:
    """A run's cells under RUN_COLUMNS."""
    state = f"live (pid {info.pid})" if info.state == "live" and info.pid else info.state
    metric = f"{info.metric} {info.metric_value:.4f} @{info.eval_step}" if info.metric_value is not None else "-"
    metric += " [yellow]collapsed[/]" if info.collapsed else ""  # every answer one class: the value is its share
    return [
        info.name,
        f"[{RUN_STATE_STYLE[info.state]}]{state}[/]",
        f"{info.step}/{info.total_steps or '?'}",
        f"{info.loss:.4f}" if info.loss is not None else "-",
        metric,
        methods,
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.modified)),
        _note(info),
    ]


def _note(info) -> str:
    """Why it stopped or failed; for a run that ended before its first step, that it holds nothing to resume."""
    said = info.message if info.state in ("stopped", "error") else ""
    if info.trained or info.state == "live":
        return said
    never = "never trained: nothing to resume; `spu train --run-dir` may reuse the folder"
    return f"{said}; {never}" if said else never


@app.command()
def runs(root: Path = typer.Argument(Path("runs"), help="folder of run folders, or one run folder")) -> None:
    """List runs: state (live, finished, stopped, error, crashed), step, last loss, eval metric and the methods on.

    The run's name is never cut (``spu-tui attach`` takes it): where a row a run does not fit, a few lines each."""
    from rich.measure import Measurement
    from rich.table import Table

    from spu_engine.core.run_metrics import describe_methods
    from spu_engine.core.runs import final_policy, list_runs

    if not root.is_dir():
        fail(f"{root}: no such folder (runs are written under ./runs by default)")
    found = list_runs(root)
    if not found:
        out.print(f"no runs under {root}")
        return
    rows = [_run_row(info, describe_methods(final_policy(info.path))) for info in found]
    table = Table(title=f"runs under {root}", title_justify="left")
    for column in RUN_COLUMNS:
        table.add_column(column, justify="right" if column in ("step", "loss") else "left", no_wrap=column == "run")
    for row in rows:
        table.add_row(*row)
    if Measurement.get(out, out.options.update_width(10_000), table).maximum <= out.width:
        out.print(table)
    else:  # too narrow for a row a run: a few lines each, the name on its own (never cut: attach takes it)
        out.print(f"runs under {root}", highlight=False)
        for run, *cells in rows:
            out.print(f"[bold]{run}[/]", soft_wrap=True, highlight=False)
            described = dict(zip(RUN_COLUMNS[1:], cells, strict=True))
            out.print("  " + "  ".join(f"{k} {v}" for k, v in described.items() if v and v != "-"), highlight=False)
    resumable = [i for i in found if i.state in ("crashed", "stopped") and i.trained]
    if resumable:
        out.print(
            f"continue a crashed or stopped run from its newest checkpoint: spu train --resume {resumable[0].path}",
            highlight=False,
        )


@app.command()
def ablate(
    run: Path = typer.Option(
        ..., "--run", help="run folder of a run trained with Houlsby adapters (peft.method: adapter)"
    ),
    blocks: str | None = typer.Option(
        None, help="blocks whose adapters to remove, e.g. '0-5' or '0,2,4' [default: every block with adapters]"
    ),
    spans: bool = typer.Option(
        True,
        "--spans/--singles",
        help="also every span of consecutive blocks (the paper's heat map), or single blocks only",
    ),
    max_eval_samples: int | None = typer.Option(
        None, help="score on the first N dev examples only (faster, noisier) (default: all)"
    ),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:1 (default: the run's)"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON (default: tables)"),
) -> None:
    """Evaluate a run's newest checkpoint with the adapters of each block (and span of blocks) removed.

    Houlsby et al. (2019), Fig. 6: the drop in the task's metric shows which blocks' adapters matter.
    Nothing of the run changes: the checkpoint is read, never written."""
    from spu_engine.core.ablation_view import ablation_views
    from spu_engine.storage.checkpoint import CheckpointError
    from spu_engine.tools.ablation import AblationError, engine_for_run
    from spu_engine.tools.ablation import ablate as run_ablation
    from spu_engine.tools.scoring import ScoreError

    read_run_config(run)  # a folder that is no run is said plainly
    chosen = None
    if blocks is not None:
        try:
            chosen = FreezeRule(layers=[part.strip() for part in blocks.split(",")], trainable=False).layers
        except ValidationError as exc:
            fail(f"--blocks {blocks!r}: {error_text(exc.errors()[0])}")
    try:
        engine = engine_for_run(run, max_eval_samples=max_eval_samples, device=device)
        with err.status("evaluating") as status:

            def progress(done: int, total: int) -> None:
                status.update(f"evaluating {done}/{total}")

            result = run_ablation(engine, chosen, spans, progress=progress)
    except (AblationError, CheckpointError, ModelLoadError, PolicyError, ScoreError) as exc:
        fail(str(exc))
    report = result.as_dict()
    if as_json:
        out.print_json(data=report)
        return
    for view in ablation_views(report):
        out.print(view)


@app.command()
def report(
    run: Path = typer.Option(..., "--run", help="run folder"),
    format: str | None = typer.Option(
        None, "--format", help="table (rich tables and terminal plots) | md | csv [default: table]"
    ),
    table: str = typer.Option(
        "summary", "--table", help="with --format csv: summary | changes | rounds (the IMP round table)"
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="write the loss and sparsity plots to this .svg or .png file "
        "(PNG needs matplotlib: pip install 'spu[plots]') (default: no plot file)",
    ),
    plot_engine: str = typer.Option(
        "auto",
        "--plot-engine",
        help="auto (matplotlib when installed) | matplotlib | plotext (terminal plots as SVG)",
    ),
) -> None:
    """What a run did: a summary (model, task, steps, final and best metrics, trainable share, sparsity), the policy
    changes with their steps and, for IMP, the round table; --plot writes the loss and sparsity plots as an image."""
    from rich.markup import escape

    from spu_engine.core.writes import WriteError
    from spu_engine.tools.report import (
        TABLES,
        ReportError,
        load_run_report,
        plot_file,
        print_run_rich,
        run_to_csv,
        run_to_markdown,
    )

    if format not in (None, "table", "md", "csv"):
        fail(f"--format: {format!r} is not one of table, md, csv")
    if table not in TABLES:
        fail(f"--table: {table!r} is not one of {', '.join(TABLES)}")
    try:
        found = load_run_report(run)
        if plot is not None:
            drawn = plot_file(found, plot, plot_engine)
            err.print(f"wrote {plot}: {drawn}", highlight=False, markup=False)
            if format is None:
                return
        if format in (None, "table"):
            print_run_rich(found, out)
            return
        sys.stdout.write(run_to_markdown(found) if format == "md" else run_to_csv(found, table))
    except (ReportError, WriteError) as exc:
        fail(escape(str(exc)))  # the message names pip extras in brackets: not markup
    for note in found.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)


@app.command("export")
def export_model(
    run: Path = typer.Option(..., "--run", help="run folder (config.json and checkpoints/)"),
    out_dir: Path = typer.Option(
        ..., "--out", help="folder to write, outside any run (a run or a checkpoint is never written)"
    ),
    merge: bool = typer.Option(
        False,
        help="lora, adalora, ia3: fold the adapters into the weights (peft's merge) and write a plain model folder "
        "[default: a peft adapter folder for the base model, PeftModel.from_pretrained(base, folder)]",
    ),
    compact: bool = typer.Option(
        False,
        help="also remove the FFN neurons, attention heads and (GPT-2) whole blocks pruning killed, outputs unchanged "
        "(default: off, pruned weights kept as zeros; a model folder: with --merge for lora, adalora, ia3)",
    ),
    force: bool = typer.Option(
        False,
        help="replace a previous export at --out (one with spu_export.json; kept until the new one is complete); "
        "any other non-empty folder, a run and a checkpoint are refused even so (default: off)",
    ),
) -> None:
    """Write a run's newest checkpoint as a folder the ecosystem loads, pruning masks folded in.

    By the run's peft.method: none or bitfit, a Hugging Face model folder (from_pretrained); lora (DoRA, rsLoRA,
    PiSSA ...), adalora and ia3, a peft adapter folder (adapter_config.json + adapter_model.safetensors; --merge for a
    model folder); adapter (Houlsby), a model folder plus spu_houlsby.py (from_pretrained(folder,
    trust_remote_code=True), or spu_engine.tools.export.houlsby.load(folder)).  Every folder has a README.md saying
    how to load it and spu_export.json (base model, task, labels) for `spu eval`."""
    from spu_engine.storage.checkpoint import CheckpointError
    from spu_engine.tools.export import ExportError, export_run

    try:
        report = export_run(run, out_dir, compact=compact, merge=merge, force=force)
    except (ExportError, CheckpointError, ModelLoadError, OSError) as exc:
        fail(str(exc))
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(f"exported {report.checkpoint.name} of {run} to {report.out_dir}", highlight=False)
    out.print(f"masked tensors: {report.masked_tensors}, zeros among them: {report.sparsity:.1%}")
    if report.format == "peft":
        out.print(f"peft adapter folder: {report.params:,} parameters (adapters and modules_to_save)")
        return
    if report.ffn_width is None:
        out.print(f"parameters: {report.params:,}")
        return
    old, new = report.ffn_width
    out.print(f"FFN width: {old} -> {new} (every block)")
    if report.blocks is not None:
        out.print(f"blocks: {report.blocks[0]} -> {report.blocks[1]}")
    if report.heads is not None:
        out.print(f"attention heads: {report.heads[0]} -> {report.heads[1]} (all blocks)")
    share = report.params / report.dense_params
    out.print(f"parameters: dense {report.dense_params:,} -> compact {report.params:,} ({share:.1%})")
    out.print(
        f"CPU forward, batch 8 x 128 tokens: dense {report.dense_seconds * 1e3:.1f} ms "
        f"-> compact {report.compact_seconds * 1e3:.1f} ms "
        f"(x{report.dense_seconds / report.compact_seconds:.2f}); max |difference| of outputs {report.max_abs_diff:.2e}"
    )


@app.command("eval")
def eval_model(
    model: str = typer.Option(
        ...,
        help="a run folder (its newest checkpoint whose weights verify), a folder from `spu export` (model, peft "
        "adapter or Houlsby adapter), "
        "or a hub id with a trained head",
    ),
    data: str = typer.Option(..., help="hub dataset or local file / folder, labelled"),
    split: str | None = typer.Option(None, help="train, dev or test of --data, or a file (default: dev, else test)"),
    metric: str | None = typer.Option(
        None,
        help="classification: accuracy | f1 | mcc "
        "(default: GLUE's for data named like a GLUE task, else the run's, else accuracy)",
    ),
    text_column: str | None = typer.Option(None, help=TEXT_COLUMN_HELP),
    label_column: str | None = typer.Option(None, help=LABEL_COLUMN_HELP),
    max_length: int | None = typer.Option(None, min=8, help="tokens per example (default: the run's, else 128)"),
    batch_size: int = typer.Option(128, min=1),
    max_samples: int | None = typer.Option(None, min=1, help="score only the first N examples (default: all)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1"),
    prompt_column: str | None = typer.Option(
        None, help="sft: the prompt column (default: the run's, else the data's shape decides)"
    ),
    completion_column: str | None = typer.Option(
        None, help="sft: the completion column (default: the run's, else the data's shape decides)"
    ),
    generate_eval: int | None = typer.Option(
        None,
        min=0,
        help="sft: greedy generations for the first N prompts, scored by exact match of the final answer "
        "('#### 72') where the data has one (default: the run's, else 0)",
    ),
    max_new_tokens: int | None = typer.Option(
        None, min=1, help="sft: the most tokens generated per prompt (default: the run's, else 256)"
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="print one JSON object (model, checkpoint, data, task, metric, value, metrics, collapsed, notes, generations) "
        "instead of the table (default: the table)",
    ),
) -> None:
    """Score a trained model on labelled data with the task's metric: a policy on data it never trained on.

    A run folder is scored as it trained (PEFT adapters, pruning masks): the engine resumes its newest checkpoint
    and evaluates.

    Labels are matched to the model's classes by name; --json prints one object for scripts.
    """
    from spu_engine.core.data import DataError
    from spu_engine.storage.checkpoint import CheckpointError
    from spu_engine.tasks.classification import METRICS
    from spu_engine.tools.export import ExportError
    from spu_engine.tools.scoring import ScoreError, ScoreOptions, score

    if metric is not None and metric not in METRICS:
        fail(f"--metric {metric}: one of {', '.join(METRICS)}")
    options = ScoreOptions(
        split,
        metric,
        text_column,
        label_column,
        max_length,
        batch_size,
        max_samples,
        device,
        prompt_column,
        completion_column,
        generate_eval,
        max_new_tokens,
    )
    try:
        result = score(model, data, options)
    except (ScoreError, DataError, CheckpointError, ExportError, ModelLoadError, PolicyError, OSError) as exc:
        fail(str(exc))
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result.as_json()) + "\n")
        return
    from rich.markup import escape
    from rich.table import Table

    scored = f"{result.model} ({Path(result.checkpoint).name})" if result.checkpoint else result.model
    out.print(f"{scored} on {result.data}", highlight=False)
    table = Table(show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"[bold]{result.metric}[/]", f"[bold]{result.metrics.get(result.metric, float('nan')):.4f}[/]")
    for key, value in result.metrics.items():
        if key != result.metric:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else escape(str(value)))
    out.print(table)
    if result.collapsed:
        out.print(f"[bold yellow]{escape(result.collapsed)}[/]", highlight=False)
    for i, generation in enumerate(result.generations):
        out.print(escape(generation.line(i + 1, len(result.generations))), highlight=False)
