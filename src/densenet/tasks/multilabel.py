"""Multi-label data and metrics: a labels CSV naming images and their labels (several per
image), its splits as datasets, and per-label AUROC and average precision (``torchmetrics``).

The CSV has a ``file`` column (a path relative to the data folder) and either one 0/1 column per
label or a ``labels`` column of ``|``-separated label names; an optional ``split`` column
(``train``, ``val``, ``test``) splits it, else a second CSV gives the validation images.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from densenet.data.datasets import DataError, DataSplits
from densenet.data.files import csv_rows
from densenet.data.images import ImageError
from densenet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from densenet.data.volumes import open_sample

__all__ = [
    "LabelTable",
    "LabelledImages",
    "decision_metrics",
    "label_metrics",
    "label_splits",
    "read_labels_csv",
]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class LabelTable:
    """The rows of a labels CSV: image paths, label names, (N, L) 0/1 float targets, and each
    row's split (None without a ``split`` column)."""

    files: list[Path]
    names: list[str]
    targets: Tensor
    splits: list[str] | None

    def subset(self, split: str) -> LabelTable:
        """The rows of one split."""
        rows = [i for i, s in enumerate(self.splits or []) if s == split]
        return LabelTable([self.files[i] for i in rows], self.names, self.targets[rows], None)


def read_labels_csv(path: str | os.PathLike, root: str | os.PathLike) -> LabelTable:
    """Read and check a labels CSV whose ``file`` column is relative to ``root``: every file
    exists, every value of a 0/1 column is 0 or 1, every split named is known."""
    path, root = Path(path), Path(root)
    rows = list(csv_rows(path, "labels file", DataError, required=("file",)))
    if not rows:
        raise DataError(f"labels file {path} has no rows")
    columns = list(rows[0])
    files = [root / row["file"] for row in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{path} names {len(missing)} file(s) that do not exist under {root} "
            f"(first: {', '.join(missing[:3])}); fix the file column or --data"
        )
    splits = [row["split"].strip() for row in rows] if "split" in columns else None
    unknown = sorted(set(splits or []) - set(SPLITS))
    if unknown:
        raise DataError(f"{path}: unknown split(s) {', '.join(unknown)}; use {', '.join(SPLITS)}")
    names, targets = _targets(path, rows, [c for c in columns if c not in ("file", "split")])
    return LabelTable(files, names, targets, splits)


def _targets(
    path: Path, rows: list[dict[str, str]], columns: list[str]
) -> tuple[list[str], Tensor]:
    names, targets = _read_targets(path, rows, columns)
    if len(names) < 2:
        raise DataError(
            f"{path} has {len(names)} label(s) ({', '.join(names) or 'none'}); multi-label "
            "training needs two or more. One yes/no label is single-label classification: "
            "put the images in two class folders"
        )
    return names, targets


def _read_targets(
    path: Path, rows: list[dict[str, str]], columns: list[str]
) -> tuple[list[str], Tensor]:
    if columns == ["labels"]:
        sets = [{n.strip() for n in row["labels"].split("|") if n.strip()} for row in rows]
        names = sorted(set().union(*sets))
        values = [[float(n in s) for n in names] for s in sets]
        return names, torch.tensor(values)
    values = [[row[c].strip() for c in columns] for row in rows]
    bad = next(((i, v) for i, row in enumerate(values) for v in row if v not in ("0", "1")), None)
    if bad is not None or not columns:
        raise DataError(
            f"{path}: expected one 0/1 column per label or a 'labels' column of |-separated names"
            + (f"; row {bad[0] + 1} holds {bad[1]!r}" if bad is not None else "")
        )
    return columns, torch.tensor([[float(v) for v in row] for row in values])


def check_both_classes(table: LabelTable, what: str) -> None:
    """Each label must be both present and absent in ``table`` (else AUROC is undefined and the
    label cannot be learnt)."""
    positives = table.targets.sum(0)
    single = [n for n, p in zip(table.names, positives.tolist()) if p in (0, len(table.files))]
    if single:
        raise DataError(
            f"label(s) {', '.join(single)} have one class only in the {what} images (every image "
            "has them, or none has); drop them or add images of the other class"
        )


class LabelledImages(Dataset):
    """Items ``(PIL image, (L,) float targets)`` (volume files: ``((C, D, H, W) voxels,
    targets)``), or ``None`` for an unreadable file."""

    def __init__(self, table: LabelTable) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table.files)

    def __getitem__(self, index: int) -> tuple[Any, Tensor] | None:
        try:
            return open_sample(self.table.files[index]), self.table.targets[index]
        except ImageError as error:
            log.warning("skipped unreadable image: %s", error)
            return None


def label_splits(
    labels: str | os.PathLike, root: str | os.PathLike, val_labels: str | os.PathLike | None
) -> DataSplits:
    """Training splits from a labels CSV (its ``split`` column, or ``val_labels`` for the
    validation images); each label must have both classes in the training and validation sets."""
    table = read_labels_csv(labels, root)
    if val_labels is not None:
        train, val, test = table, read_labels_csv(val_labels, root), None
        if val.names != train.names:
            raise DataError(f"{val_labels} has labels {val.names}, {labels} has {train.names}")
    elif table.splits is None:
        raise DataError(f"{labels} has no 'split' column; add one or give --val-labels")
    else:
        train, val = table.subset("train"), table.subset("val")
        test = table.subset("test") if "test" in table.splits else None
    for part, what in ((train, "training"), (val, "validation")):
        if not part.files:
            raise DataError(f"{labels}: no {what} images")
        check_both_classes(part, what)
    return DataSplits(
        str(labels),
        LabelledImages(train),
        LabelledImages(val),
        LabelledImages(test) if test is not None else None,
        train.names,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )


def pos_weight(dataset: LabelledImages) -> Tensor:
    """``negatives / positives`` per label: BCE's weight that balances rare labels."""
    targets = dataset.table.targets
    return (len(targets) - targets.sum(0)) / targets.sum(0)


def label_metrics(probabilities: Tensor, targets: Tensor, names: Iterable[str]) -> dict[str, Any]:
    """Per-label and mean AUROC and average precision of (N, L) ``probabilities`` against 0/1
    ``targets`` (torchmetrics' binary definitions), as a JSON-ready dict. A label whose images
    are all positive or all negative has neither (None, listed in ``undefined``) and is left out
    of the means (None when no label has both classes)."""
    from torchmetrics.functional.classification import (
        multilabel_auroc,
        multilabel_average_precision,
    )

    names = list(names)
    targets = targets.long()
    positives = targets.sum(0)
    defined = (positives > 0) & (positives < len(targets))
    with warnings.catch_warnings():  # torchmetrics warns of the labels reported as undefined
        warnings.simplefilter("ignore", UserWarning)
        auroc = multilabel_auroc(probabilities, targets, len(names), average="none")
        ap = multilabel_average_precision(probabilities, targets, len(names), average="none")

    def mean(values: Tensor) -> float | None:
        return float(values[defined].mean()) if bool(defined.any()) else None

    return {
        "images": len(targets),
        "mean_auroc": mean(auroc),
        "mean_ap": mean(ap),
        "undefined": [n for n, ok in zip(names, defined.tolist()) if not ok],
        "labels": {
            n: {
                "auroc": float(a) if ok else None,
                "ap": float(p) if ok else None,
                "positives": int(t),
            }
            for n, a, p, t, ok in zip(names, auroc, ap, positives, defined.tolist())
        },
    }


def decision_metrics(
    probabilities: Tensor, targets: Tensor, thresholds: tuple[float, ...] | None
) -> list[dict[str, float | None]]:
    """Per label, the decisions at its threshold (``probability >= threshold``; None: 0.5 each):
    the threshold, sensitivity, specificity and precision (None where undefined)."""
    cut = torch.tensor(thresholds or (0.5,) * probabilities.shape[1])
    decided, actual = probabilities >= cut, targets.bool()
    tp = (decided & actual).sum(0).double()
    rows = []
    for j, threshold in enumerate(cut.tolist()):
        positives, negatives = actual[:, j].sum(), (~actual[:, j]).sum()
        called = decided[:, j].sum()
        true_negatives = (~decided[:, j] & ~actual[:, j]).sum()
        rows.append(
            {
                "threshold": threshold,
                "sensitivity": float(tp[j] / positives) if positives else None,
                "specificity": float(true_negatives / negatives) if negatives else None,
                "precision": float(tp[j] / called) if called else None,
            }
        )
    return rows


@torch.no_grad()
def predict_labels(
    predict: Callable[[Tensor], Tensor], loader: Iterable
) -> tuple[Tensor, Tensor, int]:
    """``predict``'s outputs (N, L) and the targets (N, L) of a loader of ``collate`` batches,
    and the number of unreadable images skipped. ``predict`` takes the images, (N, C, H, W) or
    (N, V, C, H, W) test-time views: ``densenet.Runner.probabilities`` (the card's, averaged
    over the views), ``densenet.tasks.accuracy.ModuleProbabilities(...).probabilities`` (a module's,
    e.g. sigmoids), or ``Runner.logits``. ``DataError`` when no image could be read."""
    outputs, targets, skipped = [], [], 0
    for images, labels, dropped in loader:
        skipped += dropped
        if labels.numel() == 0:
            continue
        outputs.append(predict(images).float().cpu())
        targets.append(labels)
    if not outputs:
        raise DataError(
            f"none of the {skipped} images could be read (each skipped as unreadable); check "
            "the data folder and its image files"
        )
    return torch.cat(outputs), torch.cat(targets), skipped
