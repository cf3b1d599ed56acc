"""The paper's named data sets (CIFAR-10, CIFAR-100, SVHN): where their local copies live, how
torchvision reads (and downloads) them, and their training-set statistics."""

from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets

from densenet.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    UNIT_MEAN,
    UNIT_STD,
)
from densenet.errors import DataError

__all__ = ["NAMED_DATASETS", "NamedDataset", "default_data_root", "named_dataset"]

DATA_ROOT_ENV = "DENSENET_DATA"


@dataclass(frozen=True)
class NamedDataset:
    """A data set torchvision can read (and download), with its training-set statistics."""

    title: str
    folder: str  # what torchvision expects under the data root
    url: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

NAMED_DATASETS: dict[str, NamedDataset] = {
    "cifar10": NamedDataset(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        classes=_CIFAR10_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": NamedDataset(
        title="CIFAR-100",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        classes=(),
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
    "svhn": NamedDataset(
        title="SVHN",
        folder="train_32x32.mat, extra_32x32.mat, test_32x32.mat",
        url="http://ufldl.stanford.edu/housenumbers/",
        classes=tuple(str(i) for i in range(10)),
        mean=UNIT_MEAN,
        std=UNIT_STD,
    ),
}


def default_data_root() -> Path:
    """Where named datasets live: ``$DENSENET_DATA``, else ``~/.cache/densenet/data``."""
    return Path(os.environ.get(DATA_ROOT_ENV, "~/.cache/densenet/data")).expanduser()


def named_dataset(
    name: str, split: str, root: str | os.PathLike | None = None, download: bool = False
) -> Dataset:
    """CIFAR-10/100 or SVHN as a dataset of ``(PIL image, label)``.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"svhn"``.
        split: ``"train"`` or ``"test"``. SVHN's ``"train"`` is its train and extra sets
            together (604,388 images), as in the paper.
        root: the folder holding the local copy (default ``default_data_root()``).
        download: fetch the data set into ``root`` when it is not there.
    """
    if name not in NAMED_DATASETS:
        raise DataError(f"unknown dataset {name!r}; named datasets: {', '.join(NAMED_DATASETS)}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    spec = NAMED_DATASETS[name]
    root = Path(root).expanduser() if root is not None else default_data_root()
    try:
        if name == "svhn":
            parts = ("train", "extra") if split == "train" else ("test",)
            sets = [datasets.SVHN(str(root), split=p, download=download) for p in parts]
            dataset = sets[0] if len(sets) == 1 else ConcatDataset(sets)
            dataset.classes = list(spec.classes)
            return dataset
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(str(root), train=split == "train", download=download)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"cannot download {spec.title} into {root} ({reason}); put a local copy there "
            f"({spec.folder}, from {spec.url}) or pass another data root"
        ) from None
    except RuntimeError as error:
        if "not found" not in str(error).lower():
            raise
        raise DataError(
            f"{spec.title} is not in {root} (expected {spec.folder} there, from {spec.url}); "
            "put a local copy there, pass another data root, or allow the download"
        ) from None
