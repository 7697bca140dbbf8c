"""Files of rows (JSON lines, Parquet) as the readers of training data and of requests take them: each row with where
it is ("FILE:LINE", "FILE:ROW"), a DataError naming the row and what to fix."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


class DataError(ValueError):
    """A row that cannot be used; the message names the row and what to fix."""


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for every non-blank line; `where` is "FILE:LINE", for errors. A file of no rows is a DataError
    naming it: an empty training set had been "no training examples", which file left unsaid."""
    path = Path(path)
    rows = 0
    try:
        lines = path.open("rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror}); give a JSONL file") from None
    with lines:
        for n, raw in enumerate(lines, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                                "; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg}, column {error.colno}); one object a line")
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply to read; one flat object a line") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            rows += 1
            yield where, row
    if not rows:
        raise DataError(f"{path}: holds no rows (it is empty or blank); give a JSONL file, one JSON object a line")


def read_rows(path: str | Path) -> Iterator[tuple[str, dict]]:
    """read_jsonl's rows, or a Parquet file's (how Hugging Face datasets ship: UltraChat, UltraFeedback), each
    `where` "FILE:ROW"."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        yield from read_jsonl(path)
        return
    import pyarrow as pa

    rows = 0
    try:
        for rows, row in enumerate(parquet_rows(path), start=1):
            yield f"{path}:{rows}", row
    except (pa.ArrowException, OSError) as error:
        brief = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a readable Parquet file after {rows} rows ({brief}); "
                        "write it again or give JSONL") from None
    if not rows:
        raise DataError(f"{path}: holds no rows; give a Parquet or JSONL file of rows")


def parquet_rows(file: str | Path | BinaryIO) -> Iterator[dict[str, Any]]:
    """Each row as a dict of its columns, a batch of rows at a time: memory holds a batch, never the file. A file
    cut short (its footer, the table of contents every row is found by, gone) or not Parquet raises
    pyarrow.ArrowException or OSError."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        yield from batch.to_pylist()
