"""Datasets and loaders for training and evaluation: ImageNet-style folders (one sub-folder per
class, of images or of volumes), the paper's named datasets (CIFAR-10, CIFAR-100, SVHN: read by
``densenet.data.named``), deterministic per-sample augmentation, and the batch sampler that
shards each global batch over processes.

Unreadable images do not stop a run: a folder dataset yields ``None`` for them, and ``collate``
drops them and counts them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, Subset
from torchvision import datasets

from densenet.data.card import ModelCard
from densenet.data.images import IMAGE_SUFFIXES, ImageError
from densenet.data.named import NAMED_DATASETS, default_data_root, named_dataset
from densenet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from densenet.data.volumes import (
    VOLUME_SUFFIXES,
    is_sample_file,
    is_volume_file,
    open_sample,
    volume_channels,
)
from densenet.errors import DataError

__all__ = [
    "NAMED_DATASETS",
    "DataError",
    "DataSplits",
    "ImageFolderData",
    "ModelInput",
    "ShardedBatchSampler",
    "TransformedDataset",
    "collate",
    "default_data_root",
    "eval_dataset",
    "load_splits",
    "named_dataset",
    "shard_indices",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInput:
    """What a model takes, to check data against when they are opened, before any work: images,
    or volumes of ``channels`` channels (None: any number, the same in every file; once found,
    ``channels_of`` names the file they were taken from). ``what`` names the model in messages."""

    volumes: bool = False
    channels: int | None = None
    what: str = "the model"
    channels_of: str | None = None

    @classmethod
    def of(cls, card: ModelCard) -> ModelInput:
        """What the model of ``card`` takes."""
        volumes = card.volume is not None
        return cls(volumes, card.in_channels if volumes else None)

    def check(self, files: Iterable[str | os.PathLike]) -> ModelInput:
        """Refuse, in one line naming it, the first of ``files`` that the model does not take: a
        volume for an image model, an image for a volume model, a volume of other channels.
        Returns this with ``channels`` set to the volumes' (a file that cannot be read is left
        to be skipped when it is)."""
        channels, first = self.channels, self.channels_of
        for file in files:
            if is_volume_file(file) != self.volumes:
                kind, takes = ("an image", "volumes") if self.volumes else ("a volume", "images")
                raise DataError(f"{file} is {kind}; {self.what} takes {takes}")
            if not self.volumes:
                continue
            try:
                found = volume_channels(file)
            except ImageError:
                continue
            if channels is None:
                channels, first = found, os.fspath(file)
            elif found != channels:
                takes = f"{channels}" if first is None else f"{channels} (those of {first})"
                raise DataError(f"{file} has {found} channel(s); {self.what} takes {takes}")
        return dataclasses.replace(self, channels=channels, channels_of=first)

    def check_named(self, name: str) -> None:
        """Refuse a named data set (images) for a volume model."""
        if self.volumes:
            raise DataError(f"{name} holds images; {self.what} takes volumes")


class ImageFolderData(datasets.ImageFolder):
    """An ImageNet-style folder: one sub-folder per class, classes in sorted folder-name order
    (for ImageNet, the 1000 synset folders: the class index order of the official weights).

    Items are ``(PIL image, label)`` (for volume files, ``((C, D, H, W) voxels, label)``:
    ``densenet.data.volumes.open_sample``), or ``None`` for a file that cannot be read (logged with
    its path and reason), so that one bad file never stops a run. With ``takes``, every file is
    checked to be what the model takes (``ModelInput.check``); ``takes`` is then the checked one.
    """

    def __init__(self, root: str | os.PathLike, takes: ModelInput | None = None) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{root} is not a folder")
        try:
            super().__init__(str(root), is_valid_file=is_sample_file, allow_empty=True)
        except FileNotFoundError:
            raise DataError(
                f"{root} has no class sub-folders; expected one sub-folder of images per class"
            ) from None
        if not self.samples:
            suffixes = ", ".join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)
            raise DataError(
                f"{root} holds no images or volumes ({suffixes}) in its class sub-folders "
                f"({', '.join(self.classes[:5])}{', ...' if len(self.classes) > 5 else ''})"
            )
        self.takes = takes.check(path for path, _ in self.samples) if takes is not None else None

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        try:
            return open_sample(path), label
        except ImageError as error:
            log.warning("skipped unreadable image: %s", error)
            return None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for the augmentation of image ``index`` in ``epoch``: the same in every process
    layout, with or without loader workers, before and after a resume."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) & 0x7FFF_FFFF_FFFF_FFFF


class TransformedDataset(Dataset):
    """``base`` (items ``(PIL image, label)`` or ``None``) with ``transform`` applied.

    With a ``seed``, items are indexed ``(epoch, index)`` and each image's random transform
    draws from its own generator seeded by ``sample_seed(seed, epoch, index)``; the global
    random state is left untouched.
    """

    def __init__(
        self,
        base: Dataset,
        transform: Callable,
        seed: int | None = None,
        target_transform: Callable[[int], int] | None = None,
    ) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.base[index]
        if item is None:
            return None
        image, label = item
        if self.target_transform is not None:
            label = self.target_transform(label)
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label


def collate(
    batch: Sequence[tuple[torch.Tensor, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Items -> ``(images (N, ...), labels (N,) int64 or (N, L) targets, skipped)``, dropping unreadable items
    (``None``) and counting them in ``skipped``. N may be 0."""
    good = [item for item in batch if item is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in good])
    if isinstance(good[0][1], torch.Tensor):  # multi-label targets (L,)
        labels = torch.stack([label for _, label in good])
    else:
        labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, skipped


class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Training batches: each epoch a permutation of ``range(size)`` seeded by ``(seed, epoch)``
    is cut into global batches of ``batch_size`` (an incomplete last one is dropped). Each
    global batch is cut into ``world_size * accumulate`` equal contiguous micro-batches; this
    rank yields micro-batches ``rank * accumulate ... + accumulate - 1`` of every global batch.

    One process with ``accumulate=n`` therefore sees exactly the micro-batches that n processes
    see, and ``set_epoch(epoch, start_step)`` resumes in the middle of an epoch. Items are
    ``(epoch, index)`` keys for ``TransformedDataset``.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        parts = world_size * accumulate
        if batch_size % parts:
            raise DataError(
                f"batch size {batch_size} does not split into {world_size} process(es) x "
                f"{accumulate} micro-batch(es); choose a multiple of {parts}"
            )
        if size < batch_size:
            raise DataError(
                f"the training set has {size} images, fewer than one batch of {batch_size}; "
                "lower the batch size"
            )
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world_size, self.accumulate = rank, world_size, accumulate
        self.micro_batch = batch_size // parts
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per epoch."""
        return self.size // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulate

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.accumulate):
                start = (
                    step * self.batch_size
                    + (self.rank * self.accumulate + micro) * self.micro_batch
                )
                yield [(self.epoch, i) for i in order[start : start + self.micro_batch]]


def shard_indices(size: int, rank: int = 0, world_size: int = 1) -> range:
    """This rank's contiguous share of ``range(size)`` for evaluation (every index exactly once
    over all ranks; shares differ in length by at most one)."""
    return range(rank * size // world_size, (rank + 1) * size // world_size)


@dataclass
class DataSplits:
    """The splits of a training run, as datasets of ``(PIL image, label)`` (or ``None``)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _check_same_classes(train_dir: Path, val_dir: Path, train: list[str], val: list[str]) -> None:
    if train == val:
        return
    only = {train_dir: sorted(set(train) - set(val)), val_dir: sorted(set(val) - set(train))}
    details = [
        f"only in {folder}: {', '.join(names[:5])}" for folder, names in only.items() if names
    ]
    raise DataError(
        f"the training and validation folders have different classes ({'; '.join(details)}); "
        "give both the same class sub-folders"
    )


def _check_no_empty_class(train_dir: Path, train: ImageFolderData, allowed: bool) -> None:
    """Refuse (or, when ``allowed``, warn about) class folders holding no training image."""
    used = {label for _, label in train.samples}
    empty = [name for i, name in enumerate(train.classes) if i not in used]
    if not empty:
        return
    listed = f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}"
    if not allowed:
        raise DataError(
            f"{train_dir} has {len(empty)} class folder(s) without images ({listed}); remove "
            "them, or pass --allow-empty-classes to train a classifier with outputs for them"
        )
    log.warning("%s: class folders without images (%s) still get an output", train_dir, listed)


def load_splits(
    data: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    holdout: int = 0,
    seed: int = 0,
    allow_empty_classes: bool = False,
    takes: ModelInput | None = None,
) -> DataSplits:
    """The train/validation(/test) splits of ``data``.

    Args:
        data: a named dataset (``"cifar10"``, ``"cifar100"``, ``"svhn"``: validation on the
            test set, or on ``holdout`` images held out of the training set, the test set then
            being kept for the end) or a folder with ``train/`` and ``val/`` ImageFolder
            sub-folders with the same classes.
        root: the data root for named datasets.
        download: allow downloading a named dataset that is not in ``root``.
        holdout: training images held out for validation (chosen by a permutation seeded with
            ``seed``), named datasets only.
        allow_empty_classes: accept class folders without training images (the model still
            gets an output for each, with a warning); refused by default.
        takes: what the model takes: every file of a folder is checked against it, the
            validation volumes against the training volumes' channels.
    """
    if data in NAMED_DATASETS:
        if takes is not None:
            takes.check_named(data)
        spec = NAMED_DATASETS[data]
        train = named_dataset(data, "train", root, download)
        test = named_dataset(data, "test", root, download)
        classes = list(getattr(train, "classes", None) or spec.classes)
        if holdout:
            if not 0 < holdout < len(train):  # type: ignore[arg-type]
                raise DataError(f"holdout {holdout} must be between 1 and {len(train) - 1}")  # type: ignore[arg-type]
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
            val = Subset(train, order[:holdout].tolist())
            train = Subset(train, order[holdout:].tolist())
            return DataSplits(data, train, val, test, classes, spec.mean, spec.std)
        return DataSplits(data, train, test, None, classes, spec.mean, spec.std)
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"--data {data!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor a folder"
        )
    if holdout:
        raise DataError("holdout applies to named datasets; a folder brings its own val/ split")
    missing = [p for p in ("train", "val") if not (folder / p).is_dir()]
    if missing:
        raise DataError(
            f"{folder} has no {' and no '.join(m + '/' for m in missing)} sub-folder; a training "
            "folder needs train/ and val/, each with one sub-folder of images per class"
        )
    train = ImageFolderData(folder / "train", takes)
    val = ImageFolderData(folder / "val", train.takes)
    _check_same_classes(folder / "train", folder / "val", train.classes, val.classes)
    _check_no_empty_class(folder / "train", train, allow_empty_classes)
    return DataSplits(
        str(folder), train, val, None, list(train.classes), IMAGENET_MEAN, IMAGENET_STD
    )


def eval_dataset(
    data: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    takes: ModelInput | None = None,
) -> tuple[Dataset, list[str]]:
    """The evaluation set that ``data`` names and its class names: a named dataset's test
    split, a folder's ``val/`` sub-folder when it has one, else the folder itself (one
    sub-folder per class, e.g. the ImageNet validation set in its 1000 synset folders).
    ``takes``: what the model takes, checked against every file (``ModelInput.check``)."""
    if data in NAMED_DATASETS:
        if takes is not None:
            takes.check_named(data)
        dataset = named_dataset(data, "test", root, download)
        return dataset, list(getattr(dataset, "classes", None) or NAMED_DATASETS[data].classes)
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"{data!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor a folder"
        )
    if (folder / "val").is_dir() and (folder / "train").is_dir():
        folder = folder / "val"
    dataset = ImageFolderData(folder, takes)
    return dataset, list(dataset.classes)
