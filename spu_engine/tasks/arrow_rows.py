"""Rows on disk: a data file's columns as an Arrow table, memory-mapped, so a large file is never held in memory.

A local file is read once, row by row (``data.iter_rows``, so its values are exactly what the list reading gives),
into an Arrow table in the ``datasets`` cache (``HF_DATASETS_CACHE``, where ``load_dataset`` caches local files),
keyed by the file's path, size and modification time; a hub dataset is Arrow already.  Only the columns a task
reads are kept, as text: a row's value is ``str(value)``, what the tasks made of it anyway.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spu_engine.core.data import DataError, iter_rows

ROWS_VERSION = 2  # bump when the table's contents change for the same file


def _columns_of(
    path: str, columns: tuple[str, ...], optional: tuple[str, ...], stamp: tuple[int, int], version: int, as_json: bool
):
    """The generator ``datasets`` writes the table from (``stamp`` and ``version`` key its cache, unread here); a
    row without an ``optional`` column (a label, which the label check names) has it missing.  ``as_json``: each
    value as its JSON text (a list of messages comes back as it was, ``json.loads``)."""
    as_text = json.dumps if as_json else text
    for number, row in enumerate(iter_rows(Path(path)), 1):
        try:
            yield {c: as_text(row.get(c) if c in optional else row[c]) for c in columns}
        except KeyError as exc:
            raise DataError(f"{path}: row {number} has no column {exc.args[0]!r}") from None


def text(value) -> str | None:
    """A value as the tasks read it, ``str(value)``; a missing one (null, NaN) stays missing, so a label check sees
    it as such and not as the word 'None'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def local_table(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = (), as_json: bool = False):
    """``columns`` of a local file as a memory-mapped ``datasets.Dataset`` of strings, built on the first read
    (``optional``: the columns a row may lack; ``as_json``: values kept as JSON text, for structured ones)."""
    columns = tuple(dict.fromkeys(columns))
    return file_table(_columns_of, path, columns, {"columns": columns, "optional": tuple(optional), "as_json": as_json})


def file_table(generator, path: Path, columns: tuple[str, ...], kwargs: dict):
    """The table ``generator`` writes from the file at ``path`` (string ``columns``), cached by ``datasets`` under
    the file's path, size, modification time and ``ROWS_VERSION`` with ``kwargs``; a DataError it raises, or a cache
    that cannot be written, comes out as one DataError."""
    import datasets

    stat = path.stat()
    try:
        with quiet():
            return datasets.Dataset.from_generator(
                generator,
                features=datasets.Features({c: datasets.Value("string") for c in columns}),
                gen_kwargs={
                    "path": str(path.resolve()),
                    "stamp": (stat.st_size, stat.st_mtime_ns),
                    "version": ROWS_VERSION,
                    **kwargs,
                },
            )
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from None
        raise
    except OSError as exc:
        raise DataError(cache_note(exc)) from None


def cache_note(exc: OSError) -> str:
    """What a run says when the data cache cannot be written (read-only home, full disk)."""
    import datasets

    return (
        f"cannot write the data cache in {datasets.config.HF_DATASETS_CACHE} ({exc.strerror or exc}); "
        "set HF_DATASETS_CACHE to a writable folder with room"
    )


def label_values(table, column: str) -> list[str]:
    """The distinct values of ``column`` as text, read a chunk at a time (only that column's pages are touched)."""
    import pyarrow.compute as pc

    seen: set[str] = set()
    for chunk in column_chunks(table, column):
        seen.update(str(v) for v in pc.unique(chunk).to_pylist())
    return sorted(seen)


def column_chunks(table, column: str, rows: int = 65_536):
    """``column`` of the table's rows (a selection's, not its file's) as Arrow arrays of ``rows`` values at most."""
    for batch in table.select_columns([column]).with_format("arrow").iter(batch_size=rows):
        yield batch[column]


@contextmanager
def quiet() -> Iterator[None]:
    """``datasets``' progress bars off while it builds a table or a cache (the engine's stdout is its protocol's,
    its log the run's)."""
    import datasets

    shown = datasets.utils.is_progress_bar_enabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.utils.enable_progress_bars()
