"""Top-1 and top-5 accuracy and calibration error of a model over a loader of labelled images
(single crops, or test-time views such as the paper's ten crops with the softmax averaged), alone
or sharded over distributed processes: what ``densenet eval`` reports and what training validates
with."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from densenet.data.card import Calibration
from densenet.data.transforms import flatten_views
from densenet.tasks.calibration import BINS, bin_sums, ece_of_bins

__all__ = ["EvalResult", "ModuleProbabilities", "Predictor", "evaluate"]


@dataclass
class EvalResult:
    """Accuracies in %, ``loss`` the mean negative log-likelihood of the true class (nats),
    ``ece`` the expected calibration error of the top class's probability (``BINS`` bins),
    ``brier`` the mean squared error of the probability vector, ``seconds`` the wall time of the
    whole loop (decoding and transfers included)."""

    top1: float
    top5: float
    loss: float
    images: int
    skipped: int
    seconds: float
    ece: float = 0.0
    brier: float = 0.0

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


class Predictor(Protocol):
    """What ``evaluate`` scores: ``probabilities`` of (N, C, H, W) images, or of (N, V, C, H, W)
    test-time views of each, -> (N, num_classes) on ``device``, averaged over the views
    (``densenet.Runner``, or ``ModuleProbabilities`` around a module)."""

    device: torch.device

    def probabilities(self, batch: Tensor) -> Tensor: ...


@dataclass
class ModuleProbabilities:
    """A module's probabilities in eval mode (its mode is restored after each batch), under
    autocast to ``amp_dtype`` (None: float32): ``calibration`` (if any) on its logits, then
    ``normalise`` (a softmax over classes, or e.g. ``torch.sigmoid`` for multi-label models)."""

    module: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    calibration: Calibration | None = None
    normalise: Callable[[Tensor], Tensor] = partial(torch.softmax, dim=-1)

    @torch.no_grad()
    def probabilities(self, batch: Tensor) -> Tensor:
        images, views = flatten_views(batch, getattr(self.module, "spatial_dims", 2))
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.autocast(self.device.type, self.amp_dtype, self.amp_dtype is not None):
                logits = self.module(images)
        finally:
            self.module.train(was_training)
        logits = logits.float() if self.calibration is None else self.calibration.apply(logits)
        return self.normalise(logits).view(len(batch), views, -1).mean(1)


@torch.no_grad()
def evaluate(
    model: nn.Module | Predictor,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    distributed: bool = False,
    progress: bool = False,
    desc: str = "eval",
    calibration: Calibration | None = None,
) -> EvalResult:
    """Top-1/top-5 accuracy and calibration of ``model``'s softmax probabilities.

    Args:
        model: a module (run in eval mode, its mode restored afterwards) or a ``Predictor``
            (such as ``densenet.Runner``, which applies its card's calibration itself).
        loader: batches ``(images, labels)`` or ``(images, labels, skipped)`` (what
            ``densenet.data.datasets.collate`` makes): images (N, C, H, W), or (N, V, C, H, W) for
            test-time views (``densenet.data.transforms.VIEWS``), whose probabilities are averaged
            over the views; labels (N,).
        device: where a module runs (default: the module's).
        amp_dtype: a module's autocast dtype (``torch.bfloat16``/``torch.float16``), None for
            float32.
        distributed: each process holds a disjoint share of the data; the counts are summed
            over the default process group, every process gets the total.
        progress: show a progress bar.
        calibration: applied to a module's logits before the softmax (a model card's).
    """
    if isinstance(model, nn.Module):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model = ModuleProbabilities(model, device, amp_dtype, channels_last, calibration)
    start = time.perf_counter()
    sums, bins, skipped = _sums(model, loader, progress, desc)
    if distributed:
        sums, bins, skipped = _all_reduce(sums, bins, skipped)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    correct1, correct5, loss_sum, brier_sum, count = sums.tolist()
    n = max(count, 1.0)
    return EvalResult(
        top1=100.0 * correct1 / n,
        top5=100.0 * correct5 / n,
        loss=loss_sum / n,
        images=int(count),
        skipped=skipped,
        seconds=seconds,
        ece=ece_of_bins(bins),
        brier=brier_sum / n,
    )


def _sums(
    model: Predictor, loader: Iterable, progress: bool, desc: str
) -> tuple[Tensor, Tensor, int]:
    """Over ``loader``'s batches: the float64 sums of ``_batch_sums``, the top class's
    ``bin_sums`` and the unreadable images skipped."""
    sums = torch.zeros(5, dtype=torch.float64, device=model.device)
    bins = torch.zeros(3, BINS, dtype=torch.float64, device=model.device)
    skipped = 0
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
            batch_sums, batch_bins = _batch_sums(model.probabilities(images).float(), labels)
            sums += batch_sums.to(sums)
            bins += batch_bins
    return sums, bins, skipped


def _batch_sums(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Of (N, C) probabilities and (N,) labels: the sums (top-1 hits, top-5 hits, negative
    log-likelihood of the true class, Brier, images) and the top class's ``bin_sums``."""
    labels = labels.to(probs.device, non_blocking=True)
    top = probs.topk(min(5, probs.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    true_class = probs.gather(1, labels[:, None]).squeeze(1)
    sums = torch.stack(
        [
            hits[:, 0].sum(),
            hits.any(dim=1).sum(),
            -true_class.clamp_min(torch.finfo(torch.float32).tiny).log().sum(),
            (probs - F.one_hot(labels, probs.shape[1])).square().sum(),
            labels.new_tensor(labels.numel()),
        ]
    )
    return sums, bin_sums(probs.max(dim=1).values, hits[:, 0])


def _all_reduce(sums: Tensor, bins: Tensor, skipped: int) -> tuple[Tensor, Tensor, int]:
    """``sums``, ``bins`` and ``skipped`` summed over the default process group."""
    counts = torch.cat(
        [sums, bins.flatten(), torch.tensor([skipped], dtype=torch.float64, device=sums.device)]
    )
    dist.all_reduce(counts)
    return counts[:5], counts[5:-1].view(3, BINS), int(counts[-1].item())
