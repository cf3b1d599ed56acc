"""The output folder of a bulk run: the settings it was written with, the Parquet table of a
shard, and the shards already complete (a rerun skips them)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from densenet.data.files import settings_differences, temporary_of, write_json
from densenet.infer.load import LoadedModel
from densenet.tasks.bulk.options import BulkError, Options
from densenet.version import __version__
from densenet.weights.download import sha256_file

SETTINGS_FILE = "_densenet_bulk.json"  # leading "_": Parquet readers skip it
SHARD_NAME = re.compile(r"part-(\d{6,})\.parquet")
log = logging.getLogger(__name__)


def identity(loaded: LoadedModel, spec: Any, weights: Any) -> dict[str, Any]:
    """What the rows depend on besides the options: the architecture, the weights (a name, or a
    file's name and SHA-256), the card's preprocessing and multi-label flag."""
    files = [f for f in (spec, weights) if isinstance(f, (str, os.PathLike)) and Path(f).exists()]
    card = loaded.card
    return {
        "model": card.arch or str(spec),
        "weights": card.weights,
        "weights_sha256": _sha256(Path(files[0])) if files else None,
        "preprocessing": asdict(card.preprocessing),
        "multi_label": card.multi_label,
    }


def _sha256(path: Path) -> str:
    """A file's SHA-256; a folder's (an OpenVINO IR), that of its files' names and SHA-256s."""
    if path.is_file():
        return sha256_file(path)
    parts = [f"{f.name}:{sha256_file(f)}" for f in sorted(path.iterdir()) if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def run_settings(
    source: str | os.PathLike,
    options: Options,
    loaded: LoadedModel,
    spec: tuple[Any, Any],
    flags: dict[str, Any],
) -> dict[str, Any]:
    """What the rows depend on, recorded in the output folder and every shard: the input, the
    model (``spec``: the model and weights asked for), the options and ``flags`` (how the model
    runs and the images are decoded)."""
    settings = {
        "task": options.task,
        "input": os.path.abspath(source),
        **identity(loaded, *spec),
        **options.recorded(),
        **flags,
    }
    if options.task == "predict":
        settings["classes"] = loaded.card.classes
    return json.loads(json.dumps(settings))  # as read back from the folder: lists, not tuples


def to_table(
    paths: Sequence[str] | None,
    errors: Sequence[str | None],
    columns: dict[str, np.ndarray],
    classes: Sequence[str],
    metadata: dict[str, Any] | None = None,
):
    """One ``pyarrow.Table`` row per input: ``path`` (when given), ``error`` (null when fine),
    and each of ``columns`` (rows of the inputs without error, in order) as a fixed-size list,
    null for the inputs with an error; predict adds ``labels``, the names of ``indices``."""
    import pyarrow as pa

    ok = np.array([e is None for e in errors], dtype=bool)
    table: dict[str, Any] = {}
    if paths is not None:
        table["path"] = pa.array(list(paths), pa.string())
    table["error"] = pa.array(list(errors), pa.string())
    if "indices" in columns:
        names = np.asarray(classes, dtype=object)[columns["indices"]]
        table["labels"] = _fixed_lists(names, ok, pa.string())
    for name, values in columns.items():
        table[name] = _fixed_lists(values, ok)
    schema_metadata = {"densenet": json.dumps(metadata)} if metadata else None
    return pa.table(table, metadata=schema_metadata)


def _fixed_lists(rows: np.ndarray, ok: np.ndarray, type=None):
    """(n_ok, width) rows -> a FixedSizeListArray of len(ok) entries, null where not ``ok``."""
    import pyarrow as pa

    width = rows.shape[1]
    full = np.full((len(ok), width), None if rows.dtype == object else 0, dtype=rows.dtype)
    full[ok] = rows
    values = pa.array(full.reshape(-1), type=type)
    return pa.FixedSizeListArray.from_arrays(values, width, mask=pa.array(~ok))


def shard_path(out: Path, shard: int) -> Path:
    return out / f"part-{shard:06d}.parquet"


def claim_folder(out: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``out``, or check that the run there used the same."""
    out.mkdir(parents=True, exist_ok=True)
    record = out / SETTINGS_FILE
    if record.exists():
        before = json.loads(record.read_text())
        differ = settings_differences(before, settings, ignore={"version"})
        if differ:
            raise BulkError(
                f"{out} holds the output of a run with other settings ({'; '.join(differ)}); "
                "rerun with the same ones to resume, or write to a new folder"
            )
        return
    # every rank writes the same settings: whichever lands is right
    write_json(record, {**settings, "version": __version__})


def digest(paths: Sequence[str]) -> str:
    """The fingerprint of a shard's input paths, in order."""
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def done_shards(out: Path, rank: int, world_size: int, settings: dict[str, Any]) -> dict[int, str]:
    """This run's complete shards in ``out`` -> the digest of their input paths (a shard is done
    only if its paths still are the shard's, checked when listing); removes this rank's
    temporary files of killed runs. A shard that cannot be read or lacks rows is rewritten; a
    readable one written with other settings, or not by densenet, is refused (``BulkError``)."""
    import pyarrow.parquet as pq

    done = {}
    for name in sorted(os.listdir(out)):
        if match := SHARD_NAME.fullmatch(name):
            try:
                info = pq.ParquetFile(out / name).metadata
                meta = json.loads((info.metadata or {}).get(b"densenet", b"null"))
            except (OSError, ValueError) as error:
                log.warning("%s: unreadable (%s), written again", out / name, error)
                continue
            if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in settings.items()):
                raise BulkError(
                    f"{out / name} is not the output of this run (other settings, or not "
                    "written by densenet); remove it or write to a new folder"
                )
            if meta.get("shard") == int(match[1]) and meta.get("rows") == info.num_rows:
                done[int(match[1])] = meta.get("paths_sha256")
        elif (match := SHARD_NAME.fullmatch(temporary_of(name) or "")) and (
            int(match[1]) % world_size == rank
        ):  # this rank's interrupted write
            (out / name).unlink(missing_ok=True)
    return done
