"""Parquet files (how Hugging Face datasets ship) read as rows, for the readers of pretraining and post-training data."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def parquet_rows(file: str | Path | BinaryIO) -> Iterator[dict[str, Any]]:
    """Each row as a dict of its columns, a batch of rows at a time: memory holds a batch, never the file. A file
    cut short (its footer, the table of contents every row is found by, gone) or not Parquet raises
    pyarrow.ArrowException or OSError."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
        yield from batch.to_pylist()
