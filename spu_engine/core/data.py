"""Raw data sources and the batch stream.

A data source is a hub dataset name (``glue/sst2``, ``squad``, ``wikitext/wikitext-2-raw-v1``)
or a local file or folder (csv, tsv, json, jsonl, parquet, txt/raw).  A folder holds one file
per split: ``train.*`` and ``dev.*`` / ``validation.*`` / ``valid.*`` / ``test.*``.  A source
without an eval split never evaluates on its training data unasked: tasks hold out a share
(``--eval-split``, default 0.1) and say so.  Text files may start with a UTF-8 BOM.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spu_engine.core.file_kinds import not_regular

TRAIN_NAMES = ("train",)
DEV_NAMES = ("dev", "validation", "valid", "val")
TEST_NAMES = ("test",)
EVAL_NAMES = DEV_NAMES + TEST_NAMES
SPLIT_NAMES = {
    "train": TRAIN_NAMES,
    "dev": DEV_NAMES,
    "test": TEST_NAMES,
}  # what `spu eval --split` names, as files of a folder
SUFFIXES = (".tsv", ".csv", ".json", ".jsonl", ".parquet", ".txt", ".raw")
DEFAULT_EVAL_SPLIT = 0.1  # share of the training data held out for eval when the data has no eval split
TEXT_ENCODING = (
    "utf-8-sig"  # UTF-8, with or without the BOM some editors write (else it sticks to the first column name)
)


class DataError(ValueError):
    """A user error in the data: the message names the file, the column and what exists."""


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~"))


def split_files(source: str) -> dict[str, Path]:
    """Map 'train' / 'eval' to local files of a folder (or a single file used for both)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data path {source!r} does not exist")
    if path.is_file():
        return {"train": path, "eval": path}
    if (kind := not_regular(path)) != "a folder":  # a FIFO would block the read forever
        raise DataError(f"data path {source!r} is {kind}; pass a data file or a folder of them")
    found = {
        split: f for split, names in (("train", TRAIN_NAMES), ("eval", EVAL_NAMES)) if (f := find_split(path, names))
    }
    if "train" not in found and "eval" in found:
        found["train"] = found["eval"]
    if "train" not in found:
        listing = ", ".join(f.name for f in sorted(path.iterdir()) if f.is_file()) or "nothing"
        raise DataError(
            f"data folder {source!r} has no train file (looked for train.tsv/csv/json/jsonl/parquet; found {listing})"
        )
    found.setdefault("eval", found["train"])
    return found


def find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The folder's data file of the first of ``names`` it has (``dev.tsv``, ``sst2.dev.csv``, ``validation-00.parquet``)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    for name in names:
        for f in files:
            stem = f.name.lower()
            if stem.startswith(name + ".") or stem.startswith(name + "-") or f".{name}." in stem:
                return f
    return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a csv / tsv / json / jsonl / parquet file as dicts."""
    return list(iter_rows(path))


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """``read_rows`` one row at a time, so a reader of a large csv / tsv / jsonl / parquet file holds one row (a
    .json file is one document: parsed whole)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES or suffix in (".txt", ".raw"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix in (".tsv", ".csv"):
            with path.open(encoding=TEXT_ENCODING, newline="") as f:
                yield from csv.DictReader(
                    f,
                    delimiter="\t" if suffix == ".tsv" else ",",
                    quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
                )
        elif suffix == ".jsonl":
            with path.open(encoding=TEXT_ENCODING) as f:
                yield from (json.loads(line) for line in f if line.strip())
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding=TEXT_ENCODING))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
            yield from data
        else:
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches():
                yield from batch.to_pylist()
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


# GLUE's tasks by the names of its hub configs and of the folders its download script writes (MRPC, CoLA, SST-2, ...),
# each with the metric GLUE ranks it by: F1 of the positive class for MRPC and QQP, Matthews correlation for CoLA
GLUE_METRICS = {
    "cola": "mcc",
    "sst2": "accuracy",
    "mrpc": "f1",
    "qqp": "f1",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
    "wnli": "accuracy",
}
GLUE_REGRESSION = ("stsb",)  # similarity scores, not classes


def glue_task(source: str) -> str | None:
    """The GLUE task ``source`` is: a hub name ``glue/mrpc``, or a local folder (or a file in one) named like the task."""
    if is_local(source):
        path = Path(source).expanduser()
        name = (path.parent if path.is_file() else path).name
    else:
        args = hub_args(source)
        name = args[1] if args[0] == "glue" and len(args) == 2 else ""
    name = name.lower().replace("-", "").replace("_", "")
    return name if name in GLUE_METRICS or name in GLUE_REGRESSION else None


def data_metric(source: str) -> str:
    """The headline metric of classification data: GLUE's for a GLUE task, accuracy otherwise."""
    return GLUE_METRICS.get(glue_task(source) or "", "accuracy")


def hub_args(name: str) -> tuple[str, ...]:
    """``load_dataset`` arguments for a hub name: ``glue/mrpc`` is the dataset ``glue`` with the config ``mrpc``,
    and ``owner/name/config`` the dataset ``owner/name`` with that config (``openai/gsm8k/main``)."""
    parts = name.split("/")
    if len(parts) == 3 and all(parts):
        return ("/".join(parts[:2]), parts[2])
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0] in {"glue", "super_glue", "wikitext"} else (name,)


HUB_SPLITS = {
    "train": ("train",),
    "dev": ("validation", "validation_matched", "valid", "dev"),
    "test": ("test", "test_matched"),
}


def load_hub(name: str):
    """The hub dataset's splits (a ``DatasetDict``); any failure is one DataError that names the offline way."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"hub data needs the 'datasets' package: {exc}") from None
    try:
        return datasets.load_dataset(*hub_args(name))
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load hub dataset {name!r}: {text}. Offline? pass a local folder with train/dev files (e.g. --data ../shared/data/sst2)"
        ) from None


def hub_split(ds, split: str) -> list[dict[str, Any]] | None:
    """Rows of the ``train``, ``dev`` or ``test`` split of a loaded hub dataset (MNLI's dev is ``validation_matched``), None if absent."""
    table = hub_table(ds, split)
    return None if table is None else table.to_list()


def hub_table(ds, split: str):
    """``hub_split`` as the dataset's own (memory-mapped) table, None if absent."""
    found = next((n for n in HUB_SPLITS[split] if n in ds), None)
    return ds[found] if found else None


def load_hub_tables(name: str) -> dict[str, Any]:
    """``load_hub_splits`` as tables on disk (what classification reads, a row at a time)."""
    ds = load_hub(name)
    out = {"train": hub_table(ds, "train"), "eval": hub_table(ds, "dev") or hub_table(ds, "test")}
    if out["train"] is None:
        raise DataError(f"hub dataset {name!r} has no train split (splits: {', '.join(ds.keys())})")
    return {k: v for k, v in out.items() if v is not None}


def load_hub_splits(name: str) -> dict[str, list[dict[str, Any]]]:
    """Load a hub dataset ('glue/sst2' means load_dataset('glue', 'sst2')): its train split and its eval split (dev, else test)."""
    ds = load_hub(name)
    out = {"train": hub_split(ds, "train"), "eval": hub_split(ds, "dev") or hub_split(ds, "test")}
    if out["train"] is None:
        raise DataError(f"hub dataset {name!r} has no train split (splits: {', '.join(ds.keys())})")
    return {
        k: v for k, v in out.items() if v is not None
    }  # no "eval" when the dataset has no eval split: the task holds out part of train


def eval_share(eval_split: float | None) -> float:
    """The share of training data held out for eval when the data has none: --eval-split, else the default."""
    return DEFAULT_EVAL_SPLIT if eval_split is None else eval_split


def no_eval_split_note(source: str, held: str, eval_split: float | None) -> str:
    """What a run says (loudly: a warning event) when the data has no eval split."""
    if eval_split == 0:
        return f"{source} has no eval split and --eval-split is 0: evaluation runs on the training data, so its figures do not measure generalisation"
    return (
        f"{source} has no eval split: {held} held out of training for evaluation "
        f"(--eval-split {eval_share(eval_split):g}; add a dev file to evaluate on one)"
    )


def hold_out_rows(
    rows: list[Any], eval_split: float | None, seed: int, source: str
) -> tuple[list[Any], list[Any], str]:
    """Train rows, eval rows (a seeded random share, both in file order) and the note saying so."""
    train, evals, note = hold_out(len(rows), eval_split, seed, source)
    if train is None:
        return rows, rows, note
    return [rows[i] for i in train], [rows[i] for i in evals], note


def hold_out(n: int, eval_split: float | None, seed: int, source: str) -> tuple[Any, Any, str]:
    """``hold_out_rows`` by row number, for data that stays on disk: the train rows' and the eval rows' numbers (numpy
    arrays in file order; both None when --eval-split 0 evaluates on all rows) and the note."""
    share = eval_share(eval_split)
    if share == 0:
        return None, None, no_eval_split_note(source, "", eval_split)
    n_eval = round(n * share)
    if not 0 < n_eval < n:
        raise DataError(
            f"{source}: --eval-split {share:g} of {n} rows leaves {'no row for eval' if n_eval == 0 else 'no row to train on'}; "
            f"add a dev file or change --eval-split"
        )
    import torch  # here, not at the top: the console imports this module and must not load torch

    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval]] = True
    return (
        (~held).nonzero().flatten().numpy(),
        held.nonzero().flatten().numpy(),
        no_eval_split_note(source, f"{n_eval} of {n} rows, drawn with seed {seed}, are", eval_split),
    )


def require_columns(rows: list[dict[str, Any]], wanted: dict[str, str], source: str) -> None:
    """Raise a DataError naming the option, the missing column and the columns that exist."""
    existing = list(rows[0].keys()) if rows else []
    for option, column in wanted.items():
        if column not in existing:
            shown = ", ".join(
                c if isinstance(c, str) and c.isprintable() and c == c.strip() else repr(c) for c in existing
            )
            raise DataError(
                f"{source}: no column {column!r} (set by {option}); columns are: {shown or 'none (empty file)'}"
            )


def pick_column(rows: list[dict[str, Any]], candidates: tuple[str, ...]) -> str | None:
    existing = rows[0].keys() if rows else ()
    return next((c for c in candidates if c in existing), None)


def no_rows(source: str | Path) -> str:
    """What to say of data without a row: a CSV / TSV file names the header it does have (its columns are there,
    the rows are not), any other the empty file."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv") and path.is_file():
        try:
            with path.open(encoding=TEXT_ENCODING, newline="") as f:
                header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            header = []
        if header:
            return f"no rows in {source} (only the header: {', '.join(header)})"
    return f"no rows in {source}" + (" (empty file)" if path.is_file() else "")
