"""``spu``: the headless command line (train, engine, runs, report, export, eval, ablate, policy)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from .model_source import ModelLoadError
from .policy import FreezeRule, Policy, PolicyError
from .policy_files import json_schema, load_policy
from .runs import CONFIG, POLICY
from .validation import error_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SPU: selective parameter updating, headless.")
policy_app = typer.Typer(no_args_is_help=True, help="Validate policies and print their JSON schema.")
app.add_typer(policy_app, name="policy")
err = Console(stderr=True, soft_wrap=True)
out = Console()

TEXT_COLUMN_HELP = (
    "classification: the text column, or two separated by a comma for sentence pairs (--text-column sentence1,sentence2) "
    "(default: the first pair the table has: sentence1/sentence2, question/sentence, '#1 String'/'#2 String', question1/question2, "
    "premise/hypothesis; else one of sentence, text, review, ...)"
)
REPORT_TO_HELP = (
    "experiment trackers that mirror every metric and policy change: tensorboard (into <run>/tensorboard), wandb, mlflow, "
    "trackio; a comma list (tensorboard,wandb), or none (default: the policy's run: report_to, else none)"
)
METRIC_HELP = (
    "classification: the headline eval metric, accuracy | f1 (of the positive class, label 1) | mcc (Matthews correlation) "
    "(default: GLUE's for data named like a GLUE task (f1: mrpc, qqp; mcc: cola), else accuracy)"
)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def default_run_dir(model: str, task: str) -> Path:
    short = Path(model.rstrip("/")).name.replace("/", "-") or "model"
    if short == "model":
        short = Path(model.rstrip("/")).parent.name or short
    return Path("runs") / f"{short}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def report_to_list(report_to: Optional[str]) -> Optional[list[str]]:
    """``--report-to a,b`` as the list the settings hold (checked there); None when not given."""
    return None if report_to is None else [name.strip() for name in report_to.split(",") if name.strip()] or ["none"]


def check_trackers(config) -> None:
    """A tracker whose package is missing: one line and exit 2, before anything loads."""
    from .trackers import unavailable

    problem = unavailable(config.report_to)
    if problem:
        fail(problem)


def build_config(**options):
    from .engine import EngineConfig

    try:
        return EngineConfig(**{k: v for k, v in options.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError -> one line per field
        errors = getattr(exc, "errors", None)
        if errors:
            fail("; ".join(_option_error(e) for e in errors()))
        raise


def _option_error(error: dict) -> str:
    """One pydantic error as the flag to fix: '--max-length: ... (got 4)'; a check across settings names its key first."""
    message = error_text(error)
    if not error["loc"]:  # e.g. 'data: data path ... does not exist' from the task inference
        key, _, rest = message.partition(": ")
        return f"--{key.replace('_', '-')}: {rest}"
    return f"--{'-'.join(str(p) for p in error['loc']).replace('_', '-')}: {message} (got {error.get('input')!r})"


def config_from_policy(pol: Policy, source: Optional[Path], **flags):
    """The policy's ``run:`` settings, with the flags given on the command line taking precedence.

    A flag that changes a value the file sets is said on stderr (one line): a replay with a
    different --steps or --lr has a different LR schedule, so different losses.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    base = pol.run.model_dump(include=pol.run.model_fields_set) if pol.run else {}
    changed = [f"--{k.replace('_', '-')} {base[k]} -> {v}" for k, v in given.items() if k in base and base[k] != v]
    if changed:
        err.print(f"note: command-line flags override the run settings of {source}: {', '.join(changed)}", highlight=False)
    return build_config(**{**base, **given})


def read_policy(path: Optional[Path]) -> Policy:
    if path is None:
        return Policy()
    try:
        return load_policy(path)
    except PolicyError as exc:
        fail(str(exc))
        raise  # unreachable


def resume_policy(run: Path) -> Optional[Policy]:
    """policy.yaml of a run being resumed, or None when it is unreadable: the checkpoint holds the policy, and a
    resume always continues with that one, so a damaged policy.yaml must not block it."""
    try:
        return load_policy(run / POLICY)
    except PolicyError as exc:
        err.print(
            f"[yellow]note:[/] {exc}\n  resuming with the policy stored in the checkpoint; the unreadable file is kept as policy.yaml.unreadable",
            highlight=False,
        )
        return None


def read_run_config(run: Path) -> dict:
    """A run's config.json as a dict; a missing or damaged one is a one-line error."""
    path = run / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{run} is not a run folder (no config.json)")
    except (OSError, ValueError) as exc:
        fail(f"{path} cannot be read ({exc}); the run's settings are also in each checkpoint's state.json under 'config'")
    if not isinstance(data, dict):
        fail(f"{path} is not a JSON object")
    return data


class ProgressSink:
    """Rich progress bar fed by engine events (called from the training thread)."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TimeRemainingColumn(),
            console=out,
        )
        self.task = self.progress.add_task("train", total=total, loss="-", speed="-")

    def __call__(self, _line: bytes, ev: dict) -> None:
        kind = ev["type"]
        if kind == "step":
            self.progress.update(self.task, completed=ev["step"], loss=f"{ev['loss']:.4f}", speed=f"{ev['samples_per_s']:.1f}")
        elif kind == "eval":
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if k not in ("type", "t", "step") and isinstance(v, float))
            self.progress.console.print(f"[cyan]eval[/] step {ev['step']}: {metrics}")
        elif kind == "policy":
            self.progress.console.print(f"[magenta]policy[/] step {ev['step']} ({ev['source']}): trainable {ev['trainable']:,}")
        elif kind in ("error", "log") and (kind == "error" or ev.get("level") != "info"):
            self.progress.console.print(f"[red]{kind}[/] {ev.get('message')}", highlight=False)
        elif kind == "state":
            if ev["state"] == "training":
                self.progress.start()
                self.progress.console.print(ev.get("message", ""))
            elif ev["state"] in ("finished", "stopped", "error"):
                self.progress.stop()
                self.progress.console.print(f"[bold]{ev['state']}[/] {ev.get('message', '')}")
        elif kind == "checkpoint":
            self.progress.console.print(f"checkpoint: {ev['path']}")
        elif kind == "resumed":
            self.progress.update(self.task, completed=ev["step"])
            self.progress.console.print(f"[green]resumed[/] {ev['message']}")


@app.command()
def train(
    model: Optional[str] = typer.Option(None, help="hub id, local HF folder, or 'minilm' (the offline package) (default: minilm)"),
    data: Optional[str] = typer.Option(None, help="hub dataset or local file / folder with train and dev files (default: glue/sst2)"),
    policy: Optional[Path] = typer.Option(None, help="policy YAML: its run: settings are the defaults of every flag here, its timeline is replayed at its steps"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (default 1000)"),
    run_dir: Optional[Path] = typer.Option(None, help="run folder (default runs/<model>-<task>-<time>); one that holds a run is refused"),
    resume: Optional[Path] = typer.Option(None, help="resume the run in this folder from its newest complete checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start the run in --run-dir again from step 0: its checkpoints and history are deleted"),
    fresh_optimizer: bool = typer.Option(
        False, "--fresh-optimizer", help="with --resume: continue from a checkpoint whose weights verify but whose optimizer state is missing or unusable, with fresh optimizer state"
    ),
    task: Optional[str] = typer.Option(None, help="classification | qa | lm; auto: inferred from --data (and --model) (default: auto)"),
    batch_size: Optional[int] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    eval_every: Optional[int] = typer.Option(None),
    checkpoint_every: Optional[int] = typer.Option(None),
    max_eval_samples: Optional[int] = typer.Option(None),
    text_column: Optional[str] = typer.Option(None, help=TEXT_COLUMN_HELP),
    label_column: Optional[str] = typer.Option(None, help="classification: the label column (default: label, labels, target, class or Quality)"),
    metric: Optional[str] = typer.Option(None, help=METRIC_HELP),
    doc_stride: Optional[int] = typer.Option(None, help="qa: tokens shared by consecutive windows of a long context (default: a third of --max-length)"),
    eval_split: Optional[float] = typer.Option(
        None, help="share of the training data held out for eval when the data has no dev split (default 0.1; 0 evaluates on the training data)"
    ),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1"),
    report_to: Optional[str] = typer.Option(None, help=REPORT_TO_HELP),
) -> None:
    """Train in the foreground with a progress bar; writes a run folder and serves its socket.

    --policy FILE alone replays the run FILE was exported from (its run: section
    holds the settings); flags given with it override those settings.
    Ctrl-C or SIGTERM: checkpoint, then stop (a second Ctrl-C stops at once).
    --resume RUN continues from its newest complete checkpoint; --steps,
    --batch-size, --eval-every, --checkpoint-every and --device given with it
    override the run's config.json.  A --run-dir that already holds a run is
    refused unless --overwrite says to start it again.
    """
    from .runs import is_live
    from .runs import RunFolderError, holds_run
    from .server import serve

    if fresh_optimizer and resume is None:
        fail("--fresh-optimizer goes with --resume RUN")
    if overwrite and resume is not None:
        fail("--overwrite starts a run again from step 0 and --resume continues it; choose one")
    if resume is not None:
        run_dir = resume
        overrides = dict(
            steps=steps, batch_size=batch_size, eval_every=eval_every, checkpoint_every=checkpoint_every, device=device,
            report_to=report_to_list(report_to),
        )
        config = build_config(**{**read_run_config(resume), **{k: v for k, v in overrides.items() if v is not None}})
        pol = resume_policy(resume)
    else:
        pol = read_policy(policy)
        config = config_from_policy(
            pol, policy, model=model, data=data, task=task, steps=steps, batch_size=batch_size, max_length=max_length, lr=lr,
            eval_every=eval_every, checkpoint_every=checkpoint_every, max_eval_samples=max_eval_samples,
            text_column=text_column, label_column=label_column, metric=metric, seed=seed, device=device,
            doc_stride=doc_stride, eval_split=eval_split, report_to=report_to_list(report_to),
        )
        run_dir = run_dir or default_run_dir(config.model, config.task)
        if holds_run(run_dir) and not overwrite and not is_live(run_dir):  # a live one: the run lock refuses it, naming the pid
            fail(
                f"--run-dir {run_dir} already holds a run; continue it with `spu train --resume {run_dir}`, "
                f"or start it again from step 0 with --overwrite (deletes its checkpoints and history)"
            )
    check_trackers(config)
    sink = ProgressSink(config.steps)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 talks
        out.print(f"run folder: {run_dir}")
    try:
        code = serve(config, pol, Path(run_dir), resume=resume is not None, sinks=[sink], fresh_optimizer=fresh_optimizer, overwrite=overwrite)
    except RunFolderError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    raise typer.Exit(code)


@app.command(hidden=True)
def engine(
    run_dir: Path = typer.Option(..., help="run folder holding config.json and policy.yaml"),
    resume: bool = typer.Option(False, help="resume from the newest complete checkpoint"),
) -> None:
    """Run the engine process for a prepared run folder (started by spu-tui)."""
    from .runs import RunFolderError
    from .server import serve

    config = build_config(**read_run_config(run_dir))
    pol = resume_policy(run_dir) if resume else read_policy(run_dir / POLICY)
    try:
        code = serve(config, pol, run_dir, resume=resume)
    except RunFolderError as exc:
        fail(str(exc))
    raise typer.Exit(code)


RUN_STATE_STYLE = {"live": "bold green", "finished": "blue", "stopped": "yellow", "error": "red", "crashed": "bold red"}


@app.command()
def runs(root: Path = typer.Argument(Path("runs"), help="folder of run folders, or one run folder")) -> None:
    """List runs: state (live, finished, stopped, error, crashed), step, last loss and eval metric."""
    from rich.table import Table

    from .runs import list_runs

    if not root.is_dir():
        fail(f"{root}: no such folder (runs are written under ./runs by default)")
    found = list_runs(root)
    if not found:
        out.print(f"no runs under {root}")
        return
    table = Table(title=f"runs under {root}", title_justify="left")
    for column in ("run", "state", "step", "loss", "eval", "last event", "note"):
        table.add_column(column, justify="right" if column in ("step", "loss") else "left")
    for info in found:
        state = f"live (pid {info.pid})" if info.state == "live" and info.pid else info.state
        metric = f"{info.metric} {info.metric_value:.4f} @{info.eval_step}" if info.metric_value is not None else "-"
        table.add_row(
            info.name,
            f"[{RUN_STATE_STYLE[info.state]}]{state}[/]",
            f"{info.step}/{info.total_steps or '?'}",
            f"{info.loss:.4f}" if info.loss is not None else "-",
            metric,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.modified)),
            info.message if info.state in ("stopped", "error") else "",
        )
    out.print(table)
    resumable = [i for i in found if i.state in ("crashed", "stopped")]
    if resumable:
        out.print(f"continue a crashed or stopped run from its newest checkpoint: spu train --resume {resumable[0].path}", highlight=False)


@app.command()
def ablate(
    run: Path = typer.Option(..., "--run", help="run folder of a run trained with Houlsby adapters (peft.method: adapter)"),
    blocks: Optional[str] = typer.Option(None, help="blocks whose adapters to remove, e.g. '0-5' or '0,2,4' [default: every block with adapters]"),
    spans: bool = typer.Option(True, "--spans/--singles", help="also every span of consecutive blocks (the paper's heat map), or single blocks only"),
    max_eval_samples: Optional[int] = typer.Option(None, help="score on the first N dev examples only (faster, noisier)"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
) -> None:
    """Evaluate a run's newest checkpoint with the adapters of each block (and span of blocks) removed.

    Houlsby et al. (2019), Fig. 6: the drop in the task's metric shows which blocks' adapters matter.
    Nothing of the run changes: the checkpoint is read, never written."""
    from .ablation import AblationError, ablate as run_ablation, engine_for_run
    from .ablation_view import ablation_views
    from .checkpoint import CheckpointError
    from .scoring import ScoreError

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
            result = run_ablation(engine, chosen, spans, progress=lambda done, total: status.update(f"evaluating {done}/{total}"))
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
    format: Optional[str] = typer.Option(None, "--format", help="table (rich tables and terminal plots) | md | csv [default: table]"),
    table: str = typer.Option("summary", "--table", help="with --format csv: summary | changes | rounds (the IMP round table)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the loss and sparsity plots to this .svg or .png file (PNG needs matplotlib: pip install 'spu[plots]')"),
    plot_engine: str = typer.Option("auto", "--plot-engine", help="auto (matplotlib when installed) | matplotlib | plotext (terminal plots as SVG)"),
) -> None:
    """What a run did: a summary (model, task, steps, final and best metrics, trainable share, sparsity), the policy changes
    with their steps and, for IMP, the round table; --plot writes the loss and sparsity plots as an image."""
    from .report import TABLES, ReportError, load_run_report, plot_file, print_run_rich, run_to_csv, run_to_markdown
    from rich.markup import escape

    from .writes import WriteError

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
    out_dir: Path = typer.Option(..., "--out", help="folder to write: a Hugging Face model folder"),
    compact: bool = typer.Option(False, help="also remove the FFN neurons, attention heads and (GPT-2) whole blocks pruning killed, outputs unchanged"),
    force: bool = typer.Option(False, help="write into a non-empty --out folder"),
) -> None:
    """Write a run's newest checkpoint as a from_pretrained-loadable folder, pruning masks folded in."""
    from .checkpoint import CheckpointError
    from .export import ExportError, export_run

    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        fail(f"--out {out_dir} exists and is not empty; choose another folder or pass --force")
    try:
        report = export_run(run, out_dir, compact=compact)
    except (ExportError, CheckpointError, ModelLoadError, OSError) as exc:
        fail(str(exc))
    for note in report.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(f"exported {report.checkpoint.name} of {run} to {report.out_dir}", highlight=False)
    out.print(f"masked tensors: {report.masked_tensors}, zeros among them: {report.sparsity:.1%}")
    if report.ffn_width is None:
        out.print(f"parameters: {report.params:,}")
        return
    old, new = report.ffn_width
    out.print(f"FFN width: {old} -> {new} (every block)")
    if report.blocks is not None:
        out.print(f"blocks: {report.blocks[0]} -> {report.blocks[1]}")
    if report.heads is not None:
        out.print(f"attention heads: {report.heads[0]} -> {report.heads[1]} (all blocks)")
    out.print(f"parameters: dense {report.dense_params:,} -> compact {report.params:,} ({report.params / report.dense_params:.1%})")
    out.print(
        f"CPU forward, batch 8 x 128 tokens: dense {report.dense_seconds * 1e3:.1f} ms -> compact {report.compact_seconds * 1e3:.1f} ms "
        f"(x{report.dense_seconds / report.compact_seconds:.2f}); max |difference| of outputs {report.max_abs_diff:.2e}"
    )


@app.command("eval")
def eval_model(
    model: str = typer.Option(..., help="a run folder (its newest checkpoint whose weights verify), a model folder from `spu export`, or a hub id with a trained head"),
    data: str = typer.Option(..., help="hub dataset or local file / folder, labelled"),
    split: Optional[str] = typer.Option(None, help="train, dev or test of --data, or a file (default: dev, else test)"),
    metric: Optional[str] = typer.Option(None, help="classification: accuracy | f1 | mcc (default: GLUE's for data named like a GLUE task, else the run's, else accuracy)"),
    text_column: Optional[str] = typer.Option(None, help=TEXT_COLUMN_HELP),
    label_column: Optional[str] = typer.Option(None, help="classification: the label column (default: label, labels, target, class or Quality)"),
    max_length: Optional[int] = typer.Option(None, min=8, help="tokens per example (default: the run's, else 128)"),
    batch_size: int = typer.Option(128, min=1),
    max_samples: Optional[int] = typer.Option(None, min=1, help="score only the first N examples"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (model, checkpoint, data, task, metric, value, metrics) instead of the table"),
) -> None:
    """Score a trained model on labelled data with the task's metric: a policy on data it never trained on.

    A run folder is scored as it trained (PEFT adapters, pruning masks): the engine resumes its newest checkpoint and evaluates.

    Labels are matched to the model's classes by name; --json prints one object for scripts.
    """
    from .checkpoint import CheckpointError
    from .data import DataError
    from .scoring import ScoreError, ScoreOptions, score
    from .tasks.classification import METRICS

    if metric is not None and metric not in METRICS:
        fail(f"--metric {metric}: one of {', '.join(METRICS)}")
    options = ScoreOptions(split, metric, text_column, label_column, max_length, batch_size, max_samples, device)
    try:
        result = score(model, data, options)
    except (ScoreError, DataError, CheckpointError, ModelLoadError, PolicyError, OSError) as exc:
        fail(str(exc))
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result.as_json()) + "\n")
        return
    from rich.table import Table

    scored = f"{result.model} ({Path(result.checkpoint).name})" if result.checkpoint else result.model
    out.print(f"{scored} on {result.data}", highlight=False)
    table = Table(show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"[bold]{result.metric}[/]", f"[bold]{result.metrics.get(result.metric, float('nan')):.4f}[/]")
    for key, value in result.metrics.items():
        if key != result.metric:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


@policy_app.command("validate")
def policy_validate(
    file: Path,
    model: Optional[str] = typer.Option(None, help="also check every pattern and block index against this model"),
) -> None:
    """Check a policy file; with --model, check its selectors against the model's parameters."""
    pol = read_policy(file)
    if model:
        from .model import find_units, load_model
        from .selection import check_policy_against_model

        try:
            m = load_model(model)
            check_policy_against_model(pol, m, find_units(m))
        except (PolicyError, ModelLoadError) as exc:
            fail(str(exc))
    triggers = sum(e.is_trigger for e in pol.timeline)
    out.print(f"[green]ok[/] {file}: {len(pol.freeze)} freeze rules, {len(pol.timeline)} timeline entries" + (f" ({triggers} triggers)" if triggers else ""))


@policy_app.command("schema")
def policy_schema() -> None:
    """Print the policy's JSON Schema (point your editor's YAML support at it)."""
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


def main() -> None:  # pragma: no cover - entry point for python -m
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
