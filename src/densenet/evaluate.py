"""Top-1 and top-5 evaluation: ``evaluate(model, loader)`` over any loader of labelled images
(single crops, or ten crops with the softmax averaged as in the paper), alone or sharded over
distributed processes; and ``evaluate_dataset``, which ``densenet eval`` runs: a folder or named
data set, official weights or a training checkpoint, the weights' own transform.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

__all__ = ["EvalResult", "evaluate", "evaluate_dataset", "load_eval_model"]


@dataclass
class EvalResult:
    """Accuracies in %, ``loss`` the mean cross-entropy (nats), ``seconds`` the wall time of the
    whole loop (decoding and transfers included)."""

    top1: float
    top5: float
    loss: float
    images: int
    skipped: int
    seconds: float

    @property
    def top1_error(self) -> float:
        return 100.0 - self.top1

    @property
    def top5_error(self) -> float:
        return 100.0 - self.top5

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "top1_error": self.top1_error,
            "top5_error": self.top5_error,
            "images_per_second": self.images_per_second,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    distributed: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Top-1/top-5 accuracy of ``model`` (in eval mode; its mode is restored afterwards).

    Args:
        loader: batches ``(images, labels)`` or ``(images, labels, skipped)`` (what
            ``densenet.data.collate`` makes): images (N, C, H, W), or (N, crops, C, H, W) for
            multi-crop evaluation, whose softmax outputs are averaged over the crops; labels (N,).
        device: where to run (default: the model's).
        amp_dtype: autocast dtype (``torch.bfloat16``/``torch.float16``), None for float32.
        distributed: each process holds a disjoint share of the data; the counts are summed
            over the default process group, every process gets the total.
        progress: show a progress bar.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1, top-5, loss, images
    skipped = 0
    start = time.perf_counter()
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        for batch in loader:
            images, labels = batch[0], batch[1]
            skipped += int(batch[2]) if len(batch) > 2 else 0
            bar.update(1)
            if labels.numel() == 0:
                continue
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            crops = images.shape[1] if images.dim() == 5 else 0
            if crops:
                images = images.flatten(0, 1)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            logits = logits.float()
            if crops:
                probs = logits.softmax(dim=1).view(labels.numel(), crops, -1).mean(dim=1)
                scores = probs
                loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
            else:
                scores = logits
                loss = F.cross_entropy(logits, labels, reduction="sum")
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            sums += torch.stack(
                [hits[:, 0].sum(), hits.any(dim=1).sum(), loss, labels.new_tensor(labels.numel())]
            ).to(sums)
    if distributed:
        import torch.distributed as dist

        counts = torch.cat([sums, torch.tensor([skipped], dtype=torch.float64, device=device)])
        dist.all_reduce(counts)
        sums, skipped = counts[:4], int(counts[4].item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    correct1, correct5, loss_sum, count = sums.tolist()
    n = max(count, 1.0)
    return EvalResult(
        top1=100.0 * correct1 / n,
        top5=100.0 * correct5 / n,
        loss=loss_sum / n,
        images=int(count),
        skipped=skipped,
        seconds=seconds,
    )


@dataclass
class EvalModel:
    """A model ready to evaluate and what it needs: its input transform and class names."""

    model: nn.Module
    resize_size: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None  # None: the class order of the data (official weights)


def load_eval_model(
    model: str = "densenet121",
    weights: str | None = "DEFAULT",
    model_given: bool = False,
    progress: bool = True,
) -> EvalModel:
    """The model that ``densenet eval`` evaluates.

    ``weights`` may be a registry name (``"DEFAULT"``), a training checkpoint written by
    ``densenet train`` (its architecture, classes and transform are used; ``model`` must agree
    when ``model_given``), or a plain state_dict file (the number of classes taken from its
    classifier).
    """
    from .registry import get_model, model_config
    from .train import read_checkpoint
    from .transforms import IMAGENET_MEAN, IMAGENET_STD, default_eval_sizes
    from .weights import load_checkpoint, resolve_weights

    model_config(model)  # an unknown name fails here, listing the valid ones
    if weights is not None and resolve_weights(model, weights) is None:
        checkpoint = read_checkpoint(weights)
        if "arch" in checkpoint:
            arch = checkpoint["arch"]
            if model_given and model != arch:
                raise ValueError(
                    f"{weights} is a checkpoint of {arch}, not {model}; drop --model or pass "
                    f"--model {arch}"
                )
            net = get_model(arch, weights=weights, **checkpoint["model_args"])
            t = checkpoint["transform"]
            return EvalModel(
                net, t["resize_size"], t["crop_size"], tuple(t["mean"]), tuple(t["std"]),
                list(checkpoint["classes"]),
            )  # fmt: skip
        state = load_checkpoint(weights)
        num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
        net = get_model(model, weights=weights, num_classes=num_classes, progress=progress)
        return EvalModel(net, *default_eval_sizes(net), IMAGENET_MEAN, IMAGENET_STD, None)
    net = get_model(model, weights=weights, progress=progress)
    entry = net.weights_entry
    resize, crop = (entry.resize_size, entry.crop_size) if entry else default_eval_sizes(net)
    return EvalModel(net, resize, crop, IMAGENET_MEAN, IMAGENET_STD, None)


def _label_map(
    data: str, data_classes: list[str], model_classes: list[str] | None, num_classes: int
) -> Callable[[int], int] | None:
    """Data label -> model output index, matching class names when the model has them."""
    from .data import DataError

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
    model: str = "densenet121",
    weights: str | None = "DEFAULT",
    *,
    model_given: bool = False,
    ten_crop: bool = False,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "auto",
    amp: str = "none",
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
    optimize: bool = True,
) -> dict[str, Any]:
    """Evaluate on a folder or named data set (see ``densenet.data.eval_dataset``); under
    ``torchrun`` the data is sharded over the processes. Returns ``EvalResult.to_dict()`` plus
    what was evaluated. ``optimize`` runs the fast inference form (``densenet.optimize``)."""
    from .data import TransformedDataset, collate, eval_dataset, shard_indices
    from .inference import optimize as optimize_model
    from .predict import resolve_device
    from .train import amp_dtype, process_group
    from .transforms import eval_transform, ten_crop_transform

    with process_group(device) as (rank, world_size, local_device):
        target = local_device or resolve_device(device)
        spec = load_eval_model(model, weights, model_given)
        dataset, classes = eval_dataset(data, data_root, download)
        make = ten_crop_transform if ten_crop else eval_transform
        transform = make(spec.resize_size, spec.crop_size, spec.mean, spec.std)
        num_classes = spec.model.num_classes
        labels = _label_map(data, classes, spec.classes, num_classes)
        dataset = TransformedDataset(dataset, transform, target_transform=labels)
        if world_size > 1:
            dataset = Subset(dataset, list(shard_indices(len(dataset), rank, world_size)))
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
            pin_memory=target.type == "cuda", persistent_workers=False,
        )  # fmt: skip
        net = spec.model.to(target).eval()
        autocast = amp_dtype(amp, target)
        channels_last = target.type == "cuda"
        if optimize:  # the inference form computes in the asked precision and memory format
            net = optimize_model(net, dtype=autocast or torch.float32, channels_last=channels_last)
            autocast, channels_last = None, False
        elif channels_last:
            net = net.to(memory_format=torch.channels_last)
        result = evaluate(
            net, loader, device=target, amp_dtype=autocast, channels_last=channels_last,
            distributed=world_size > 1, progress=progress and rank == 0,
        )  # fmt: skip
        return {
            "data": os.fspath(data),
            "model": getattr(net, "arch", None) or model,
            "weights": weights,
            "crops": 10 if ten_crop else 1,
            "processes": world_size,
            **result.to_dict(),
        }
