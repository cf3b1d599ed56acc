"""Bulk inference: the embeddings (pooled features) or top-k predictions of many images, written
as Parquet shards of a fixed number of rows, resumable after a kill, split over torchrun ranks.

The input (a folder, a manifest of paths, or a glob) is listed lazily in a deterministic order,
so shard k holds the same images in every run and in every process. A shard is written to a
temporary name, flushed to disk and renamed, so a shard file on disk is complete: a rerun skips
the shards that exist, and under ``torchrun`` rank r writes the shards with k % world_size == r,
the output folder being the only coordination. Every input gets a row; an unreadable image gets
its error and a null vector.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from densenet.choices import VECTOR_DTYPES as DTYPES
from densenet.data.card import ModelCard, Preprocessing
from densenet.data.files import (
    atomic_write,
    csv_rows,
    settings_differences,
    temporary_of,
    write_json,
)
from densenet.data.images import ImageError, open_image, walk_files
from densenet.data.volumes import is_volume_file
from densenet.errors import DenseNetError
from densenet.infer.load import LoadedModel, load
from densenet.infer.runner import Runner
from densenet.infer.runtime import local_device, torchrun_ranks
from densenet.nn.network import Network
from densenet.version import __version__
from densenet.weights.download import sha256_file
from densenet.weights.published import WeightsArg

__all__ = [
    "DTYPES",
    "BulkError",
    "Decoder",
    "Options",
    "Outputs",
    "Summary",
    "iter_inputs",
    "run",
]

TASKS = ("embed", "predict")
SETTINGS_FILE = "_densenet_bulk.json"  # leading "_": Parquet readers skip it
log = logging.getLogger(__name__)
SHARD_NAME = re.compile(r"part-(\d{6,})\.parquet")
JPEG_MAGIC = b"\xff\xd8\xff"


class BulkError(DenseNetError):
    """A bulk run that cannot start: a missing input, a bad manifest, a mismatched out folder."""


# ---- inputs --------------------------------------------------------------------------------


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


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- the model -----------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Options:
    """What a run computes; a resumed run must use the same.

    task: ``"embed"`` (pooled features, the input of the classifier) or ``"predict"`` (top-k).
    normalize: embed: scale each vector to unit L2 norm.
    dtype: embed: ``"float32"`` or ``"float16"`` storage.
    topk: predict: the number of (label, probability) pairs per image; a multi-label model card
        gives independent sigmoid probabilities instead of a softmax, and every label's
        probability in a ``scores`` column.
    shard_size: rows per Parquet file.
    calibration: with precision ``"int8"``, the folder of images the quantization is
        calibrated on.
    exact_decode: decode every JPEG at full size, as ``densenet predict`` does; by default a
        large one is decoded at a reduced scale (``densenet.data.images.open_image``'s
        ``shorter_side``: faster, within a few grey levels after the resize).
    """

    task: str = "embed"
    normalize: bool = False
    dtype: str = "float32"
    topk: int = 5
    shard_size: int = 10_000
    calibration: str | None = None
    exact_decode: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.topk < 1 or self.shard_size < 1:
            raise ValueError(
                f"topk and shard_size must be >= 1, got {self.topk}, {self.shard_size}"
            )


class Outputs:
    """The model on preprocessed batches: (N, 3, H, W) on the device -> this task's columns as
    numpy arrays of N rows: ``embedding`` (N, D) for embed; ``indices`` (N, k) int32,
    ``probabilities`` (N, k) float32 and, for a multi-label card, ``scores`` (N, classes) for
    predict.

    optimize: run ``densenet.optimize``'s inference form (for embed, of the model without its
    classifier, whose output is the pooled features); ``precision`` its compute dtype, a name
    that ``densenet.infer.runtime.compute_dtype`` takes (None: float32 on CPU, bfloat16 on CUDA), and
    ``backend`` its engine (``densenet.optimize``'s; None: the fastest measured). False runs the
    eager model in float32.
    """

    def __init__(
        self,
        model: LoadedModel,
        options: Options,
        device: torch.device,
        optimize: bool = True,
        precision: str | None = None,
        backend: str | None = None,
    ) -> None:
        self.options, self.device, self.card = options, device, model.card
        self.multi_label = model.card.multi_label
        self.topk = min(options.topk, model.card.num_classes)
        embed = options.task == "embed"
        if embed and not isinstance(model.module, Network):
            raise BulkError(
                f"embeddings come from a DenseNet or RDNet (an architecture, weights or a training "
                f"checkpoint), not a {type(model.module).__name__}; give the model it was "
                "exported from (an exported file classifies: densenet predict --out)"
            )
        self.runner = Runner(
            model, device, optimize=optimize, dtype=precision, backend=backend, headless=embed,
            calibration=options.calibration, throughput=True,
        )  # fmt: skip
        self.precision = self.runner.precision
        if embed:
            self.widths = {"embedding": model.module.num_features}
        else:
            self.widths = {"indices": self.topk, "probabilities": self.topk}
            if self.multi_label:
                self.widths["scores"] = model.card.num_classes

    def empty(self) -> dict[str, np.ndarray]:
        """The columns of zero rows (a shard of unreadable images)."""
        dtypes = {"embedding": self.options.dtype, "indices": "int32"}
        return {k: np.zeros((0, w), dtypes.get(k, "float32")) for k, w in self.widths.items()}

    def __call__(self, images: Tensor) -> dict[str, np.ndarray]:
        if self.options.task == "embed":
            out = self.runner.logits(images)
            if self.options.normalize:
                out = F.normalize(out, dim=1)
            return {"embedding": out.to(getattr(torch, self.options.dtype)).cpu().numpy()}
        scores = self.runner.probabilities(images)
        top_p, top_i = scores.topk(self.topk, dim=1)
        columns = {"indices": top_i.int(), "probabilities": top_p}
        if self.multi_label:
            columns["scores"] = scores
        return {k: v.cpu().numpy() for k, v in columns.items()}


class Decoder:
    """A path or encoded bytes -> ((C, H, W) preprocessed tensor, None), or (None, error): the
    card's ``transform`` of the image, a JPEG decoded at a reduced scale first unless ``exact``
    (``densenet.data.images.open_image``'s ``shorter_side``: the transform's resize size)."""

    def __init__(self, pre: Preprocessing, exact: bool = False) -> None:
        self.transform = pre.transform()
        self.shorter_side = None if exact else pre.resize_size

    def __call__(self, source: str | bytes) -> tuple[Tensor | None, str | None]:
        try:
            return self.transform(open_image(source, shorter_side=self.shorter_side)), None
        except ImageError as error:
            return None, str(error)
        except (OSError, ValueError) as error:  # a decoded image the transform cannot convert
            return None, f"{source if isinstance(source, str) else 'image'}: {error}"


# ---- Parquet -------------------------------------------------------------------------------


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


def _claim_folder(out: Path, settings: dict[str, Any]) -> None:
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


def _digest(paths: Sequence[str]) -> str:
    """The fingerprint of a shard's input paths, in order."""
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def _done_shards(out: Path, rank: int, world_size: int, settings: dict[str, Any]) -> dict[int, str]:
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


# ---- loading -------------------------------------------------------------------------------


class _Images(Dataset):
    """``(shard, path)`` -> ``(shard, path, image, error)``: the image as ``decode`` gives it,
    or with ``raw`` the file's bytes as a uint8 tensor (decoded on the device later)."""

    def __init__(self, decode: Decoder, raw: bool = False) -> None:
        self.decode, self.raw = decode, raw

    def __getitem__(self, key: tuple[int, str]) -> tuple[int, str, Tensor | None, str | None]:
        shard, path = key
        if not self.raw:
            return (shard, path, *self.decode(path))
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            return shard, path, None, f"{path}: cannot be read ({error.strerror or error})"
        if not data:
            return shard, path, None, f"{path}: empty file (0 bytes)"
        return shard, path, torch.frombuffer(bytearray(data), dtype=torch.uint8), None


class _Batches:
    """The batches of ``(shard, path)`` keys of the shards ``wanted(k)`` selects; a batch never
    spans two shards. Iterated lazily by the DataLoader, one shard's paths in memory."""

    def __init__(self, paths: Iterable[str], shard_size: int, batch_size: int, wanted) -> None:
        self.paths, self.shard_size, self.batch_size = paths, shard_size, batch_size
        self.wanted = wanted

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        self.shards = 0
        for shard, chunk in enumerate(_chunks(self.paths, self.shard_size)):
            self.shards = shard + 1
            if self.wanted(shard, chunk):
                for start in range(0, len(chunk), self.batch_size):
                    yield [(shard, p) for p in chunk[start : start + self.batch_size]]


def _collate(items: list[tuple[int, str, Tensor | None, str | None]]):
    """-> (shard, paths, errors, images): images stacked (n_ok, 3, H, W), or a list of encoded
    byte tensors in device-decoding mode."""
    images = [image for _, _, image, _ in items if image is not None]
    if images and images[0].dim() == 3:
        images = torch.stack(images)
    return items[0][0], [p for _, p, _, _ in items], [e for _, _, _, e in items], images


def _decode_on_device(
    blobs: list[Tensor], paths: list[str], errors: list[str | None], pre: Preprocessing, device
) -> tuple[Tensor | None, list[str | None]]:
    """A batch's file bytes (``blobs``: one per row whose error is None, in order) ->
    ((n, 3, crop, crop) preprocessed images on ``device``, every row's error). JPEGs are decoded
    in one ``torchvision.io.decode_jpeg`` call on ``device`` and resized and cropped there; a file
    that decoder refuses (another format, a corrupt file) or with other channels than the model's
    is decoded on the CPU (which converts or refuses it as for any file), or gets its error.
    The pixels differ slightly from the CPU path's (another decoder, a tensor resize)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def on_device(blob_list: list[Tensor]) -> list[Tensor | None]:
        try:
            return decode_jpeg(blob_list, mode=mode, device=device) if blob_list else []
        except RuntimeError:  # one bad file fails them all: decode one by one
            if len(blob_list) == 1:
                return [None]
            return [image for blob in blob_list for image in on_device([blob])]

    preprocess = pre.tensor_transform()
    mode = ImageReadMode.RGB if pre.channels == 3 else ImageReadMode.UNCHANGED
    decode = Decoder(pre, exact=True)
    rows = [row for row, error in enumerate(errors) if error is None]
    jpegs = [k for k, blob in enumerate(blobs) if bytes(blob[:3].tolist()) == JPEG_MAGIC]
    decoded = dict(zip(jpegs, on_device([blobs[k] for k in jpegs])))
    errors, good = list(errors), []
    for k, row in enumerate(rows):
        if decoded.get(k) is not None and len(decoded[k]) == pre.channels:
            good.append(preprocess(decoded[k]))
            continue
        image, errors[row] = decode(paths[row])
        if image is not None:
            good.append(image.to(device))
    return (torch.stack(good) if good else None), errors


# ---- the run -------------------------------------------------------------------------------


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
    loaded = _image_model(model, weights, target, progress)
    outputs = Outputs(loaded, options, target, optimize, precision, backend)
    # device decoding: another decoder and resize, hence slightly other pixels
    flags = {"optimize": optimize, "precision": outputs.precision, "device_decode": device_decode}
    plan = _Plan(
        source=source,
        out=Path(out),
        options=options,
        card=loaded.card,
        outputs=outputs,
        target=target,
        settings=_settings(source, options, loaded, (model, weights), flags),
        batch_size=batch_size,
        workers=workers,
        device_decode=device_decode,
        progress=progress,
        rank=rank,
        world_size=world_size,
    )
    return _loop(plan, _claim(plan))


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


def _image_model(
    model: Any, weights: WeightsArg, target: torch.device, progress: bool
) -> LoadedModel:
    """``densenet.load``'s model on ``target``; refuses a volume model (``BulkError``)."""
    loaded = load(model, weights=weights, device=target, progress=progress)
    if loaded.card.volume is not None:
        raise BulkError(
            "bulk runs read images; a volume model classifies volume files with densenet predict "
            "(without --out) or densenet eval"
        )
    return loaded


def _settings(
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
        **asdict(options),
        **flags,
    }
    if options.task == "predict":
        settings["classes"] = loaded.card.classes
    return json.loads(json.dumps(settings))  # as read back from the folder: lists, not tuples


@dataclass
class _Plan:
    """A bulk run as decided before anything is written: its input and output folder, the
    model's card and outputs on ``target``, the settings recorded with every shard, the
    decoding, and this process's ``rank`` among ``world_size``."""

    source: str | os.PathLike
    out: Path
    options: Options
    card: ModelCard
    outputs: Outputs
    target: torch.device
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


def _claim(plan: _Plan) -> dict[int, str]:
    """Claim ``plan.out`` for this run's settings (``_claim_folder``) and return its complete
    shards (``_done_shards``)."""
    _claim_folder(plan.out, plan.settings)
    return _done_shards(plan.out, plan.rank, plan.world_size, plan.settings)


def _loop(plan: _Plan, done: dict[int, str]) -> Summary:
    """Write this process's shards that are not ``done``: images decoded in DataLoader processes,
    the model's outputs collected and flushed shard by shard; then remove the shards of inputs no
    longer there."""
    summary = Summary(
        plan.rank, plan.world_size, workers=plan.workers, device=str(plan.target), out=str(plan.out)
    )

    def wanted(shard: int, chunk: Sequence[str] | None = None) -> bool:
        """Whether this process writes ``shard`` (of input paths ``chunk``, when listing)."""
        if not plan.mine(shard):
            return False
        if chunk is None:  # the progress bar's estimate
            return shard not in done
        finished = done.get(shard) == _digest(chunk)
        summary.shards_skipped += finished
        return not finished

    options = plan.options
    batches = _Batches(iter_inputs(plan.source), options.shard_size, plan.batch_size, wanted)
    loader = DataLoader(
        _Images(Decoder(plan.card.preprocessing, options.exact_decode), raw=plan.device_decode),
        batch_sampler=batches,
        num_workers=plan.workers,
        collate_fn=_collate,
        pin_memory=plan.target.type == "cuda",
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
    options, outputs = plan.options, plan.outputs
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
            images, errors = _on_device(plan, images, paths, errors)
            pending["paths"] += paths
            pending["errors"] += errors
            if images is not None and len(images):
                pending["columns"].append(outputs(images))
            bar.update(len(paths))
        if current is not None:
            _flush(plan, current, pending, metadata, summary)


def _on_device(
    plan: _Plan, images: Tensor | list[Tensor], paths: list[str], errors: list[str | None]
) -> tuple[Tensor | None, list[str | None]]:
    """A loaded batch's images on ``plan.target`` (JPEG bytes decoded there when
    ``plan.device_decode``) and its errors."""
    if plan.device_decode and images:
        return _decode_on_device(images, paths, errors, plan.card.preprocessing, plan.target)
    if len(images):
        images = images.to(plan.target, non_blocking=True)
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
        "paths_sha256": _digest(paths),
    }
    table = to_table(paths, pending["errors"], columns, plan.card.classes, metadata)
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
