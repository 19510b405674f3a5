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
from pathlib import Path
from typing import Any


TRAIN_NAMES = ("train",)
EVAL_NAMES = ("dev", "validation", "valid", "val", "test")
SUFFIXES = (".tsv", ".csv", ".json", ".jsonl", ".parquet", ".txt", ".raw")
DEFAULT_EVAL_SPLIT = 0.1  # share of the training data held out for eval when the data has no eval split
TEXT_ENCODING = "utf-8-sig"  # UTF-8, with or without the BOM some editors write (else it sticks to the first column name)


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
    found: dict[str, Path] = {}
    files = sorted(p for p in path.iterdir() if p.is_file())
    for split, names in (("train", TRAIN_NAMES), ("eval", EVAL_NAMES)):
        for name in names:
            for f in files:
                stem = f.name.lower()
                if f.suffix.lower() in SUFFIXES and (stem.startswith(name + ".") or stem.startswith(name + "-") or f".{name}." in stem):
                    found.setdefault(split, f)
    if "train" not in found and "eval" in found:
        found["train"] = found["eval"]
    if "train" not in found:
        listing = ", ".join(f.name for f in files) or "nothing"
        raise DataError(f"data folder {source!r} has no train file (looked for train.tsv/csv/json/jsonl/parquet; found {listing})")
    found.setdefault("eval", found["train"])
    return found


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a csv / tsv / json / jsonl / parquet file as dicts."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            with path.open(encoding=TEXT_ENCODING, newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
                return list(reader)
        if suffix == ".jsonl":
            with path.open(encoding=TEXT_ENCODING) as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding=TEXT_ENCODING))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                return data["data"]
            if isinstance(data, list):
                return data
            raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def load_hub_splits(name: str) -> dict[str, list[dict[str, Any]]]:
    """Load a hub dataset ('glue/sst2' means load_dataset('glue', 'sst2'))."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"hub data needs the 'datasets' package: {exc}") from None
    parts = name.split("/")
    args = (parts[0], parts[1]) if len(parts) == 2 and parts[0] in {"glue", "super_glue", "wikitext"} else (name,)
    try:
        ds = datasets.load_dataset(*args)
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, ... -> one clear message
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot load hub dataset {name!r}: {text}. Offline? pass a local folder with train/dev files (e.g. --data ../shared/data/sst2)"
        ) from None
    out: dict[str, list[dict[str, Any]]] = {}
    for split, names in (("train", ("train",)), ("eval", ("validation", "valid", "dev", "test"))):
        for n in names:
            if n in ds:
                out[split] = ds[n].to_list()
                break
    if "train" not in out:
        raise DataError(f"hub dataset {name!r} has no train split (splits: {', '.join(ds.keys())})")
    return out  # no "eval" when the dataset has no eval split: the task holds out part of train


def eval_share(eval_split: float | None) -> float:
    """The share of training data held out for eval when the data has none: --eval-split, else the default."""
    return DEFAULT_EVAL_SPLIT if eval_split is None else eval_split


def no_eval_split_note(source: str, held: str, eval_split: float | None) -> str:
    """What a run says (loudly: a warning event) when the data has no eval split."""
    if eval_split == 0:
        return f"{source} has no eval split and --eval-split is 0: evaluation runs on the training data, so its figures do not measure generalisation"
    return f"{source} has no eval split: {held} held out of training for evaluation (--eval-split {eval_share(eval_split):g}; add a dev file to evaluate on one)"


def hold_out_rows(rows: list[Any], eval_split: float | None, seed: int, source: str) -> tuple[list[Any], list[Any], str]:
    """Train rows, eval rows (a seeded random share, both in file order) and the note saying so."""
    share = eval_share(eval_split)
    if share == 0:
        return rows, rows, no_eval_split_note(source, "", eval_split)
    n_eval = round(len(rows) * share)
    if not 0 < n_eval < len(rows):
        raise DataError(
            f"{source}: --eval-split {share:g} of {len(rows)} rows leaves {'no row for eval' if n_eval == 0 else 'no row to train on'}; "
            f"add a dev file or change --eval-split"
        )
    import torch  # here, not at the top: the console imports this module and must not load torch

    held = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in held]
    evals = [r for i, r in enumerate(rows) if i in held]
    return train, evals, no_eval_split_note(source, f"{n_eval} of {len(rows)} rows, drawn with seed {seed}, are", eval_split)


def require_columns(rows: list[dict[str, Any]], wanted: dict[str, str], source: str) -> None:
    """Raise a DataError naming the option, the missing column and the columns that exist."""
    existing = list(rows[0].keys()) if rows else []
    for option, column in wanted.items():
        if column not in existing:
            shown = ", ".join(c if isinstance(c, str) and c.isprintable() and c == c.strip() else repr(c) for c in existing)
            raise DataError(f"{source}: no column {column!r} (set by {option}); columns are: {shown or 'none (empty file)'}")


def pick_column(rows: list[dict[str, Any]], candidates: tuple[str, ...]) -> str | None:
    existing = rows[0].keys() if rows else ()
    return next((c for c in candidates if c in existing), None)
