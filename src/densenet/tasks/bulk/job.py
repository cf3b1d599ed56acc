"""A bulk run (``run``): this process's rank and device, the plan decided before anything is
written, and the loop that decodes the images, runs the model and writes this process's shards."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from densenet.data.files import atomic_write
from densenet.data.images import walk_files
from densenet.data.volumes import is_volume_file
from densenet.infer.load import load
from densenet.infer.runtime import local_device, torchrun_ranks
from densenet.tasks.bulk.decoding import Batches, Decoder, DeviceDecoder, Images, collate
from densenet.tasks.bulk.inputs import iter_inputs
from densenet.tasks.bulk.options import BulkError, Options
from densenet.tasks.bulk.outputs import Outputs
from densenet.tasks.bulk.shards import (
    claim_folder,
    digest,
    done_shards,
    run_settings,
    shard_path,
    to_table,
)
from densenet.version import __version__
from densenet.weights.published import WeightsArg


@dataclass
class Summary:
    """What one process did: shards written and skipped (already complete), rows and error rows
    written, wall seconds."""

    rank: int
    world_size: int
    shards_written: int = 0
    shards_skipped: int = 0
    rows: int = 0
    errors: int = 0
    seconds: float = 0.0
    workers: int = 0
    device: str = "cpu"
    out: str = ""

    def to_dict(self) -> dict[str, Any]:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return {**asdict(self), "images_per_second": rate}


def run(
    source: str | os.PathLike,
    out: str | os.PathLike,
    options: Options,
    model: str | os.PathLike | nn.Module | None = None,
    weights: WeightsArg = "DEFAULT",
    *,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    optimize: bool = True,
    precision: str | None = None,
    backend: str | None = None,
    device_decode: bool = False,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> Summary:
    """Write ``options.task``'s rows for every image of ``source`` into ``out/part-NNNNNN.parquet``.

    ``model`` and ``weights`` are what ``densenet.load`` takes (an architecture name, a weights
    file, a training checkpoint, a ``DenseNet``); the model card gives the preprocessing, the
    class names and, for predict, softmax or (multi-label) sigmoid probabilities.
    Shards already in ``out`` are skipped; ``out`` must have been written with the same model,
    weights, input and options (``BulkError`` otherwise). ``rank``/``world_size`` default to
    torchrun's ``RANK``/``WORLD_SIZE``: this process writes the shards k % world_size == rank
    (on GPU ``rank`` % the GPU count unless torchrun says which).
    Images are decoded and preprocessed in ``workers`` DataLoader processes (default: half the
    CPUs, at most 8) while the model runs; ``device_decode`` reads JPEG bytes there instead and
    decodes them on the GPU.
    """
    rank, world_size, target = _place(device, rank, world_size, device_decode)
    workers = _decoding_workers(source, batch_size, workers)
    loaded = load(model, weights=weights, device=target, progress=progress)
    outputs = Outputs(loaded, options, target, optimize, precision, backend)
    # device decoding: another decoder and resize, hence slightly other pixels
    flags = {
        "optimize": optimize,
        "precision": outputs.runner.precision,
        "device_decode": device_decode,
    }
    plan = _Plan(
        source=source,
        out=Path(out),
        outputs=outputs,
        settings=run_settings(source, options, loaded, (model, weights), flags),
        batch_size=batch_size,
        workers=workers,
        device_decode=device_decode,
        progress=progress,
        rank=rank,
        world_size=world_size,
    )
    claim_folder(plan.out, plan.settings)
    return _loop(plan, done_shards(plan.out, rank, world_size, plan.settings))


def _place(
    device: str, rank: int | None, world_size: int | None, device_decode: bool
) -> tuple[int, int, torch.device]:
    """This process's rank among ``world_size`` (default torchrun's) and its device; device
    decoding needs a CUDA one (``BulkError``)."""
    ranks = torchrun_ranks()
    rank = ranks.rank if rank is None else rank
    world_size = ranks.world_size if world_size is None else world_size
    target = local_device(device, rank if world_size > 1 else None)
    if device_decode and target.type != "cuda":
        raise BulkError("device decoding (--device-decode) needs a CUDA device; drop the option")
    return rank, world_size, target


def _decoding_workers(source: str | os.PathLike, batch_size: int, workers: int | None) -> int:
    """The DataLoader processes decoding ``source`` (default half the CPUs, at most 8; no more
    than it has batches); a missing or empty input fails here, before the model is loaded (or
    downloaded)."""
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 2) // 2))
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    first = sum(1 for _ in itertools.islice(iter_inputs(source), max(workers, 1) * batch_size))
    if first == 0:
        text = os.fspath(source)
        if os.path.isdir(text) and next(walk_files(text, is_volume_file), None) is not None:
            raise BulkError(
                f"{text} holds volumes and no images: embed and predict --out do not support "
                "volumes (densenet predict without --out classifies them)"
            )
        raise BulkError(f"no images in {text} (an empty folder, manifest or glob)")
    return min(workers, -(-first // batch_size))


@dataclass
class _Plan:
    """A bulk run as decided before anything is written: its input and output folder, the
    model's outputs (with its card, options and device), the settings recorded with every shard,
    the decoding, and this process's ``rank`` among ``world_size``."""

    source: str | os.PathLike
    out: Path
    outputs: Outputs
    settings: dict[str, Any]
    batch_size: int
    workers: int
    device_decode: bool
    progress: bool
    rank: int
    world_size: int

    def mine(self, shard: int) -> bool:
        """Whether this process writes ``shard``."""
        return shard % self.world_size == self.rank


def _loop(plan: _Plan, done: dict[int, str]) -> Summary:
    """Write this process's shards that are not ``done``: images decoded in DataLoader processes,
    the model's outputs collected and flushed shard by shard; then remove the shards of inputs no
    longer there."""
    outputs = plan.outputs
    summary = Summary(
        plan.rank,
        plan.world_size,
        workers=plan.workers,
        device=str(outputs.device),
        out=str(plan.out),
    )

    def wanted(shard: int, chunk: Sequence[str] | None = None) -> bool:
        """Whether this process writes ``shard`` (of input paths ``chunk``, when listing)."""
        if not plan.mine(shard):
            return False
        if chunk is None:  # the progress bar's estimate
            return shard not in done
        finished = done.get(shard) == digest(chunk)
        summary.shards_skipped += finished
        return not finished

    options, pre = outputs.options, outputs.card.preprocessing
    batches = Batches(iter_inputs(plan.source), options.shard_size, plan.batch_size, wanted)
    loader = DataLoader(
        Images(Decoder(pre, options.exact_decode), raw=plan.device_decode),
        batch_sampler=batches,
        num_workers=plan.workers,
        collate_fn=collate,
        pin_memory=outputs.device.type == "cuda",
    )
    start = time.perf_counter()
    _write_shards(plan, loader, wanted, summary)
    for shard in done:  # shards of inputs no longer there (the input set shrank)
        if shard >= batches.shards and plan.mine(shard):
            shard_path(plan.out, shard).unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_shards(plan: _Plan, loader: DataLoader, wanted, summary: Summary) -> None:
    """Run the model on ``loader``'s batches and write each shard once its last batch is in,
    with a progress bar (its total counted in the background)."""
    options, outputs = plan.outputs.options, plan.outputs
    decode = (
        DeviceDecoder(outputs.card.preprocessing, outputs.device) if plan.device_decode else None
    )
    metadata = {**plan.settings, "version": __version__}
    with tqdm(desc=options.task, unit="img", disable=not plan.progress, dynamic_ncols=True) as bar:
        if plan.progress:
            _count_in_background(plan.source, options.shard_size, wanted, bar)
        pending: dict[str, list] = {"paths": [], "errors": [], "columns": []}
        current = None
        for shard, paths, errors, images in loader:
            if current is not None and shard != current:
                _flush(plan, current, pending, metadata, summary)
            current = shard
            images, errors = _on_device(outputs.device, decode, images, paths, errors)
            pending["paths"] += paths
            pending["errors"] += errors
            if images is not None and len(images):
                pending["columns"].append(outputs(images))
            bar.update(len(paths))
        if current is not None:
            _flush(plan, current, pending, metadata, summary)


def _on_device(
    device: torch.device,
    decode: DeviceDecoder | None,
    images: Tensor | list[Tensor],
    paths: list[str],
    errors: list[str | None],
) -> tuple[Tensor | None, list[str | None]]:
    """A loaded batch's images on ``device`` (JPEG bytes decoded there by ``decode`` when
    decoding on the device) and its errors."""
    if decode is not None and images:
        return decode(images, paths, errors)
    if len(images):
        images = images.to(device, non_blocking=True)
    return images, errors


def _flush(plan: _Plan, shard: int, pending, metadata, summary: Summary) -> None:
    """Write the pending rows as shard ``shard`` and clear them."""
    parts = pending["columns"] or [plan.outputs.empty()]
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    paths = pending["paths"]
    metadata = {
        **metadata,
        "shard": shard,
        "first_row": shard * metadata["shard_size"],
        "rows": len(paths),
        "paths_sha256": digest(paths),
    }
    table = to_table(paths, pending["errors"], columns, plan.outputs.card.classes, metadata)
    import pyarrow.parquet as pq

    atomic_write(shard_path(plan.out, shard), lambda temp: pq.write_table(table, temp))
    summary.shards_written += 1
    summary.rows += table.num_rows
    summary.errors += sum(e is not None for e in pending["errors"])
    for values in pending.values():
        values.clear()


def _count_in_background(source, shard_size: int, wanted, bar) -> None:
    """Give ``bar`` its total (the images of this process's shards still to write, hence an
    ETA) once a second listing of the input, in a thread, has counted them."""

    def count() -> None:
        n = sum(1 for _ in iter_inputs(source))
        bar.total = sum(
            min(shard_size, n - k * shard_size) for k in range(-(-n // shard_size)) if wanted(k)
        )
        bar.refresh()

    threading.Thread(target=count, daemon=True).start()
