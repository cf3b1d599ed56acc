"""``densenet eval``: ``evaluate_dataset`` measures top-1/top-5 on a folder or named data set
with the model's own preprocessing, for official weights, a weights file or a training
checkpoint (``evaluate``, the counting itself, lives in ``densenet.accuracy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from .accuracy import EvalResult, evaluate
from .data import DataError, TransformedDataset, collate, eval_dataset, shard_indices
from .inference import BucketedModel
from .inference import optimize as optimize_model
from .load import load
from .multilabel import LabelledImages, label_metrics, predict_labels, read_labels_csv
from .preprocessing import ModelCard, default_classes
from .runtime import amp_dtype, process_group

__all__ = ["EvalResult", "evaluate", "evaluate_dataset"]


def _label_map(
    data: str, data_classes: list[str], model_classes: list[str] | None, num_classes: int
) -> Callable[[int], int] | None:
    """Data label -> model output index, matching class names when the model has them (None:
    the data's class order is the model's, as for official weights and ImageNet's synsets)."""
    if model_classes is None or data_classes == model_classes:
        if len(data_classes) != num_classes:
            raise DataError(
                f"{data} has {len(data_classes)} classes but the model has {num_classes} outputs; "
                "evaluate on a data set with the model's classes (for ImageNet weights: the "
                "1000 synset folders of the validation set)"
            )
        return None
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in data_classes if name not in index]
    if unknown:
        raise DataError(
            f"classes of {data} unknown to the model: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (the model's: {', '.join(model_classes[:5])} ...)"
        )
    return [index[name] for name in data_classes].__getitem__


def evaluate_dataset(
    data: str,
    model: str | None = None,
    weights: str | None = "DEFAULT",
    *,
    ten_crop: bool = False,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "auto",
    amp: str = "none",
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
    optimize: bool = True,
    labels: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Evaluate on a folder or named data set (see ``densenet.data.eval_dataset``) with the
    model's own preprocessing; under ``torchrun`` the data is sharded over the processes.
    ``model`` and ``weights`` as ``densenet.load`` (None: the training checkpoint ``weights``
    names, else densenet121). Returns ``EvalResult.to_dict()`` plus what was evaluated.
    ``optimize`` runs the fast inference form (``densenet.optimize``). A multi-label model is
    evaluated on the images of a ``labels`` CSV (files relative to ``data``; the rows of
    ``split``, default its ``val`` rows when it has a split column): per-label and mean AUROC
    and average precision (``densenet.multilabel.label_metrics``)."""
    with process_group(device) as (rank, world_size, target):
        loaded = load(model, weights=weights, device=target)
        card = loaded.card
        pre = card.preprocessing
        transform = pre.ten_crop_transform() if ten_crop else pre.transform()
        if card.multi_label or labels is not None:
            if ten_crop or world_size > 1:
                raise DataError("a multi-label model is evaluated on one crop, in one process")
            dataset = TransformedDataset(_labelled_images(data, labels, split, card), transform)
        else:
            dataset, classes = eval_dataset(data, data_root, download)
            # default names (ImageNet's, "class i") are matched by index: the data's folder order
            named = card.classes != default_classes(card.num_classes)
            label_map = _label_map(
                data, classes, list(card.classes) if named else None, card.num_classes
            )
            dataset = TransformedDataset(dataset, transform, target_transform=label_map)
        if world_size > 1:
            dataset = Subset(dataset, list(shard_indices(len(dataset), rank, world_size)))
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
            pin_memory=target.type == "cuda", persistent_workers=False,
        )  # fmt: skip
        net = loaded.module
        autocast = amp_dtype(amp, target)
        channels_last = target.type == "cuda"
        if optimize:  # the inference form computes in the asked precision and memory format
            net = optimize_model(net, dtype=autocast or torch.float32, channels_last=channels_last)
            if target.type == "cuda":  # static shapes, one CUDA graph per batch size
                net = BucketedModel(net, batch_size * (10 if ten_crop else 1), cuda_graphs=True)
            autocast, channels_last = None, False
        elif channels_last:
            net = net.to(memory_format=torch.channels_last)
        if card.multi_label:
            probabilities, targets, skipped = predict_labels(net, loader, target, autocast)
            scores = {**label_metrics(probabilities, targets, card.classes), "skipped": skipped}
        else:
            scores = evaluate(
                net, loader, device=target, amp_dtype=autocast, channels_last=channels_last,
                distributed=world_size > 1, progress=progress and rank == 0,
            ).to_dict()  # fmt: skip
        return {
            "data": os.fspath(data),
            "model": card.arch or model,
            "weights": weights,
            "crops": 10 if ten_crop else 1,
            "processes": world_size,
            **scores,
        }


def _labelled_images(
    data: str, labels: str | None, split: str | None, card: ModelCard
) -> LabelledImages:
    """The images of a labels CSV for a multi-label model, checked against its labels."""
    if labels is None or not card.multi_label:
        raise DataError(
            "a multi-label model is evaluated with --labels CSV"
            if labels is None
            else f"--labels is for multi-label models; {card.arch or 'this model'} has one label "
            "per image (evaluate it on a folder of class sub-folders)"
        )
    table = read_labels_csv(labels, data)
    if table.names != list(card.classes):
        raise DataError(f"{labels} has labels {table.names}, the model {list(card.classes)}")
    if table.splits is not None:
        table = table.subset(split or "val")
    if not table.files:
        raise DataError(f"{labels} has no {split or 'val'} rows")
    return LabelledImages(table)
