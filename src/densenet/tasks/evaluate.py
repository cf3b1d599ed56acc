"""``densenet eval`` and ``densenet calibrate``: ``evaluate_dataset`` measures top-1/top-5 (or
per-label AUROC) and calibration error on a folder or named data set with the model's own
preprocessing, for official weights, a weights file or a training checkpoint (``evaluate``, the
counting itself, lives in ``densenet.tasks.accuracy``); ``calibrate_dataset`` fits the calibration and
thresholds on the same data and writes a calibrated copy of the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from densenet.data.card import ModelCard, default_classes
from densenet.data.datasets import (
    DataError,
    ModelInput,
    TransformedDataset,
    collate,
    eval_dataset,
    shard_indices,
)
from densenet.data.files import atomic_write, check_output_file
from densenet.data.transforms import VIEWS
from densenet.deprecation import renamed_keywords
from densenet.infer.load import LoadedModel, load
from densenet.infer.runner import Runner
from densenet.infer.runtime import process_group, resolve_device
from densenet.nn.network import Network
from densenet.nn.registry import model_config
from densenet.tasks.accuracy import EvalResult, evaluate
from densenet.tasks.calibration import (
    FEW_POSITIVES,
    CalibrationError,
    ThresholdRule,
    calibration_metrics,
    choose_thresholds,
    few_positives,
    fit_calibration,
    reliability_diagram,
    unpromised,
)
from densenet.tasks.multilabel import (
    LabelledImages,
    decision_metrics,
    label_metrics,
    predict_labels,
    read_labels_csv,
)
from densenet.weights.checkpoint import (
    CheckpointError,
    TrainCheckpoint,
    read_checkpoint,
    save_checkpoint,
)

__all__ = ["EvalResult", "calibrate_dataset", "evaluate", "evaluate_dataset"]


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


@renamed_keywords(calibration="calibration_images")
def evaluate_dataset(
    data: str,
    model: str | None = None,
    weights: str | None = "DEFAULT",
    *,
    ten_crop: bool = False,
    tta: str | None = None,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "auto",
    dtype: str | None = None,
    backend: str | None = None,
    calibration_images: str | os.PathLike | None = None,
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
    optimize: bool = True,
    labels: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Evaluate on a folder or named data set (see ``densenet.data.datasets.eval_dataset``) with the
    model's own preprocessing; under ``torchrun`` the data is sharded over the processes.
    ``tta`` averages the probabilities of test-time views (``densenet.data.transforms.VIEWS``:
    hflip, five-crop, ten-crop; ``ten_crop`` is ``tta="ten-crop"``), after the card's calibration.
    ``model`` and ``weights`` as ``densenet.load`` (None: the training checkpoint ``weights``
    names, else densenet121). Returns ``EvalResult.to_dict()`` plus what was evaluated.
    The model runs as ``densenet.Runner`` runs it: ``optimize`` (the fast inference form,
    ``densenet.optimize``), ``backend`` (its engine; None: the fastest measured), ``dtype`` (its
    precision; ``"int8"`` quantized on the images in the ``calibration_images`` folder) and the card's
    calibrated probabilities. A multi-label model is evaluated on the images of a ``labels`` CSV
    (files relative to ``data``; the rows of ``split``, default its ``val`` rows when it has a
    split column): per-label and mean AUROC and average precision
    (``densenet.tasks.multilabel.label_metrics``)."""
    tta = "ten-crop" if ten_crop else tta
    views = VIEWS[tta] if tta is not None else 1
    with process_group(device) as (rank, world_size, target):
        loaded = load(model, weights=weights, device=target)
        card = loaded.card
        if (card.multi_label or labels is not None) and world_size > 1:
            raise DataError("a multi-label model is evaluated in one process")
        dataset = _labelled_set(data, card, card.transform(tta), labels, split, data_root, download)
        loader = _loader(dataset, batch_size, workers, target, rank, world_size)
        runner = Runner(
            loaded,
            target,
            optimize=optimize,
            dtype=dtype,
            backend=backend,
            batch_size=batch_size * views,
            calibration_images=calibration_images,
            progress=progress and rank == 0,
            throughput=True,
        )
        scores = _scores(runner, loader, world_size > 1, progress and rank == 0)
        evaluated = {"data": os.fspath(data), "model": card.arch or model, "weights": weights}
        run = {"crops": views, "tta": tta, "calibrated": card.calibration is not None}
        run |= {"precision": runner.precision, "processes": world_size}
        return {**evaluated, **run, **scores}


def _loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    target: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """``collate`` batches of ``dataset``, or of this process's share of it when ``world_size``
    processes share it (``shard_indices``), in memory pinned for a CUDA ``target``."""
    if world_size > 1:
        dataset = Subset(dataset, list(shard_indices(len(dataset), rank, world_size)))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=target.type == "cuda",
        persistent_workers=False,
    )


def _scores(
    runner: Runner, loader: DataLoader, distributed: bool, progress: bool
) -> dict[str, Any]:
    """What ``evaluate_dataset`` measures with ``runner`` on ``loader``: ``evaluate``'s scores
    for a single-label model; for a multi-label one, per label and overall, the AUROC and
    average precision, the calibration error and the decisions at the card's thresholds."""
    card = runner.card
    if not card.multi_label:
        return evaluate(runner, loader, distributed=distributed, progress=progress).to_dict()
    probabilities, targets, skipped = predict_labels(runner.probabilities, loader)
    calibration_scores = calibration_metrics(probabilities, targets, True, card.classes)
    scores = label_metrics(probabilities, targets, card.classes)
    decided = decision_metrics(probabilities, targets, card.thresholds)
    per_label = calibration_scores.pop("labels").values()
    for name, row, at in zip(card.classes, per_label, decided):
        scores["labels"][name].update(ece=row["ece"], brier=row["brier"], nll=row["nll"], **at)
    return {**scores, **calibration_scores, "skipped": skipped}


def _labelled_set(
    data: str,
    card: ModelCard,
    transform: Callable,
    labels: str | None,
    split: str | None,
    data_root: str | None,
    download: bool,
) -> TransformedDataset:
    """The labelled images to measure a model on, transformed: a labels CSV's rows for a
    multi-label model, else a class folder or named data set with the card's class order;
    every file checked to be what the model takes."""
    takes = ModelInput.of(card)
    if card.multi_label or labels is not None:
        images = _labelled_images(data, labels, split, card)
        takes.check(images.table.files)
        return TransformedDataset(images, transform)
    dataset, classes = eval_dataset(data, data_root, download, takes)
    # default names (ImageNet's, "class i") are matched by index: the data's folder order
    named = card.classes != default_classes(card.num_classes)
    label_map = _label_map(data, classes, list(card.classes) if named else None, card.num_classes)
    return TransformedDataset(dataset, transform, target_transform=label_map)


def calibrate_dataset(
    data: str,
    model: str | None = None,
    weights: str | None = "DEFAULT",
    *,
    out: str | os.PathLike | None = None,
    threshold: str | None = None,
    labels: str | None = None,
    split: str | None = None,
    diagram: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "auto",
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the calibration of a model's probabilities on labelled validation images (the same
    data as ``evaluate_dataset``) and write a copy of the model with it in its card.

    Single-label: one temperature; multi-label: per label a temperature or Platt scaling
    (``densenet.tasks.calibration.fit_calibration``), and with a ``threshold`` rule (``f1``,
    ``youden``, ``sensitivity=S``, ``precision=P``) each label's decision threshold. ``out``:
    the calibrated copy, a training checkpoint (default ``<weights>.calibrated.pth`` beside a
    weights file; the original is never written); ``diagram``: a reliability diagram (PNG,
    default beside ``out``). Returns the fit, the expected calibration error, Brier score and
    negative log-likelihood before and after (per label and overall), the thresholds, and
    warnings for labels with too few positives or negatives to trust or whose sensitivity or
    precision target their images cannot promise. What cannot be written (``out``, ``diagram``)
    or calibrated (random weights, an exported or int8 model) is refused before the model runs,
    and what cannot be fitted (``fit_calibration``) before writing."""
    rule = ThresholdRule.parse(threshold) if threshold is not None else None
    if weights is None:
        raise CalibrationError(
            "--weights none: random weights have nothing to calibrate; give trained weights or "
            "a checkpoint of `densenet train`"
        )
    out, diagram = _calibration_outputs(model, weights, out, diagram, (data, labels))
    target = resolve_device(device)
    loaded = load(model, weights=weights, device=target)
    card = loaded.card.replace(calibration=None)
    checkpoint = _calibrated_checkpoint(loaded, model, weights)
    if rule is not None and not card.multi_label:
        raise DataError("--threshold is for multi-label models; a single-label one takes the top")
    dataset = _labelled_set(data, card, card.transform(), labels, split, data_root, download)
    logits, targets, skipped = _logits(loaded, target, dataset, batch_size, workers, progress)
    calibrated, warnings = _fit(card, logits, targets, rule)
    report = {
        "data": os.fspath(data),
        "images": len(targets),
        "skipped": skipped,
        "temperatures": calibrated.calibration.temperatures,
        "bias": calibrated.calibration.bias,
        "threshold_rule": str(rule) if rule is not None else None,
        "thresholds": dict(zip(card.classes, calibrated.thresholds)) if rule else None,
        "warnings": warnings,
        **_before_after(card, calibrated, logits, targets, diagram),
    }
    save_checkpoint(replace(checkpoint, card=calibrated), out)
    return {**report, "out": str(out), "diagram": str(diagram)}


def _logits(
    loaded: LoadedModel,
    target: torch.device,
    dataset: Dataset,
    batch_size: int,
    workers: int,
    progress: bool,
) -> tuple[Tensor, Tensor, int]:
    """The model's float32 logits (N, C) over ``dataset`` on ``target``, the targets (N,) or
    (N, L) and the number of unreadable images skipped."""
    runner = Runner(loaded, target, dtype=torch.float32)
    loader = _loader(dataset, batch_size, workers, target)
    batches = tqdm(loader, desc="calibrate", unit="batch", disable=not progress, leave=False)
    return predict_labels(runner.logits, batches)


def _fit(
    card: ModelCard, logits: Tensor, targets: Tensor, rule: ThresholdRule | None
) -> tuple[ModelCard, list[str]]:
    """``card`` with the calibration fitted on ``logits`` (``fit_calibration``) and each label's
    threshold chosen by ``rule`` (if any), and warnings for the labels whose calibration or
    threshold rests on too few images."""
    names = card.classes
    fit = fit_calibration(logits, targets, card.multi_label, names)
    calibrated = card.replace(calibration=fit)
    warnings = [
        f"label {name} has fewer than {FEW_POSITIVES} positive or negative validation "
        "images: its calibration and threshold rest on too few"
        for name in (few_positives(targets, names) if card.multi_label else [])
    ]
    if rule is None:
        return calibrated, warnings
    probabilities = calibrated.probabilities(logits)
    calibrated = calibrated.replace(thresholds=choose_thresholds(probabilities, targets, rule))
    warnings += [
        f"label {names[j]}: {rule} cannot be promised with 95% confidence on these "
        "validation images (too few); its threshold does not meet it"
        for j in unpromised(probabilities, targets, calibrated.thresholds, rule)
    ]
    return calibrated, warnings


def _before_after(
    card: ModelCard, calibrated: ModelCard, logits: Tensor, targets: Tensor, diagram: Path
) -> dict[str, Any]:
    """The calibration error, Brier score and negative log-likelihood of ``logits`` under
    ``card`` (``before``) and ``calibrated`` (``after``), and their reliability diagram written
    to ``diagram``."""
    report, curves = {}, {}
    for when, which in (("before", card), ("after", calibrated)):
        probabilities = which.probabilities(logits)
        report[when] = calibration_metrics(probabilities, targets, card.multi_label, card.classes)
        curves[f"{when} (ECE {report[when]['ece']:.3f})"] = _reliability(
            probabilities, targets, card.multi_label
        )
    image = reliability_diagram(curves, title=f"reliability on {len(targets)} images")
    atomic_write(diagram, lambda tmp: image.save(tmp, format="PNG"))
    return report


def _reliability(
    probabilities: Tensor, targets: Tensor, multi_label: bool
) -> tuple[Tensor, Tensor]:
    """(confidence, outcome) pairs to draw: every label's probability against its 0/1 target
    for a multi-label model, else the top class's probability against being right."""
    if multi_label:
        return probabilities.flatten(), targets.flatten()
    confidence, predicted = probabilities.max(1)
    return confidence, (predicted == targets).double()


def _calibration_outputs(
    model: str | None,
    weights: str | None,
    out: str | os.PathLike | None,
    diagram: str | os.PathLike | None,
    data: tuple[str | os.PathLike | None, ...],
) -> tuple[Path, Path]:
    """The calibrated copy's path (``out``, else beside the weights file) and the diagram's
    (default beside it), both checked writable, apart, and neither an input (the model file,
    the ``data`` folder and labels file) before any work."""
    source = next((Path(s) for s in (weights, model) if s and Path(s).is_file()), None)
    if out is None:
        if source is None:
            raise DataError("give --out FILE: where to write the calibrated model")
        out = source.with_name(f"{source.stem}.calibrated.pth")
    inputs = (source, *data)
    out = check_output_file(out, "--out", inputs)
    diagram = check_output_file(
        diagram if diagram is not None else out.with_suffix(".reliability.png"), "--diagram", inputs
    )
    if diagram.resolve() == out.resolve():
        raise DataError(f"--diagram {diagram} is the --out file; give them different paths")
    return out, diagram


def _calibrated_checkpoint(
    loaded: LoadedModel, model: str | None, weights: str | None
) -> TrainCheckpoint:
    """The training checkpoint the calibrated copy is written as (its card replaced): the
    source checkpoint's (all of it), or a new one holding the DenseNet's weights and
    configuration."""
    if weights is not None and Path(weights).is_file():
        try:
            return read_checkpoint(weights)
        except CheckpointError:  # a plain weights file
            pass
    if isinstance(loaded.module, Network) and loaded.card.arch is not None:
        arch_config = model_config(loaded.card.arch)
        model_args = {k: v for k, v in loaded.module.config.items() if arch_config.get(k) != v}
        return TrainCheckpoint(loaded.card, loaded.module.state_dict(), model_args)
    raise DataError(
        f"{model or weights}: calibrate writes a densenet checkpoint; give a checkpoint of "
        "`densenet train` or a named architecture with weights (not an exported file, an int8 "
        "model or a custom configuration)"
    )


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
