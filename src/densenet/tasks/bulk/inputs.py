"""The input of a bulk run: a folder, a manifest of paths or a glob, listed lazily in the same
order on every call, and cut into shards."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from densenet.data.files import csv_rows
from densenet.data.images import walk_files
from densenet.tasks.bulk.options import BulkError


def iter_inputs(source: str | os.PathLike) -> Iterator[str]:
    """The image paths of ``source``, lazily, in the same order on every call.

    ``source``: a folder (its image files by suffix, recursively, each folder's entries sorted
    by name); a ``.parquet`` or ``.csv`` manifest with a ``path`` column, or any other file as a
    text manifest of one path per line (relative paths are taken from the manifest's folder); or
    a glob (``photos/**/*.jpg``).
    """
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        return walk_files(path)
    if path.is_file():
        return _manifest(path)
    if any(c in text for c in "*?["):
        return _glob(text)
    raise BulkError(f"{text}: no such file, folder or matching glob")


def _manifest(path: Path) -> Iterator[str]:
    base = path.parent
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        if "path" not in file.schema_arrow.names:
            raise BulkError(f"manifest {path} has no 'path' column ({file.schema_arrow.names})")
        for batch in file.iter_batches(columns=["path"]):
            yield from (str(base / p) for p in batch.column(0).to_pylist())
        return
    if path.suffix.lower() == ".csv":
        rows = csv_rows(path, "manifest", BulkError, required=("path",))
        yield from (str(base / row["path"]) for row in rows)
        return
    with open(path, newline="", encoding="utf-8-sig") as lines:
        yield from (str(base / line.strip()) for line in lines if line.strip())


def _glob(pattern: str) -> Iterator[str]:
    """Files matching ``pattern`` (``*``, ``?``, ``[...]`` within a name, ``**`` for any number
    of folders), walked lazily from the pattern's longest literal folder."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    wanted = parts[fixed:]
    if not base.is_dir():
        raise BulkError(f"{pattern}: no folder {base} to search")
    return walk_files(base, lambda p: _matches(p.relative_to(base).parts, wanted))


def _matches(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _matches(parts[1:], pattern[1:])
    )


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
