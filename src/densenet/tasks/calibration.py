"""Probabilities that mean what they say, and thresholds chosen by a rule.

``fit_calibration`` fits, on a labelled validation set's logits, a per-output affine map of the
logits that the model card then applies before its softmax or sigmoid (``ModelCard.calibrated``):

- single-label: temperature scaling, ``softmax(z / T)`` (one ``T`` for all classes);
- multi-label: per label, temperature scaling ``sigmoid(z / T)`` or Platt scaling
  ``sigmoid(a z + b)``; Platt's extra offset is kept only where it pays for its parameter
  (Bayesian information criterion on the validation images).

Both maps are increasing, so they change no ranking: accuracy, AUROC and average precision stay as
they were. ``choose_thresholds`` picks each label's decision threshold on the calibrated
probabilities by a named rule; ``calibration_metrics`` reports expected calibration error, Brier
score and negative log-likelihood, per label and overall; ``reliability_diagram`` draws them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from densenet.data.card import Calibration
from densenet.errors import DenseNetError

__all__ = [
    "BINS",
    "CalibrationError",
    "ThresholdRule",
    "bin_sums",
    "calibration_metrics",
    "choose_thresholds",
    "ece_of_bins",
    "few_positives",
    "fit_calibration",
    "reliability_diagram",
    "unpromised",
    "wilson_lower_bound",
]


BINS = 15  # equal-width confidence bins of the expected calibration error


FEW_POSITIVES = 30  # below this many positives (or negatives) a label's fit is unreliable


class CalibrationError(DenseNetError, ValueError):
    """Data that calibration cannot use (no images, one class only, outputs that are not finite,
    an unknown rule)."""


def fit_calibration(
    logits: Tensor, targets: Tensor, multi_label: bool, names: Sequence[str] | None = None
) -> Calibration:
    """Fit the calibration of (N, K) validation ``logits``.

    Args:
        targets: (N,) class indices for a single-label model, (N, K) 0/1 for a multi-label one.
        names: the K class or label names, for the messages (default their indices).

    Raises ``CalibrationError`` for what cannot be fitted: no images, a non-finite logit, images
    of one class only (single-label) or a label without both classes, and a fit that diverges.
    """
    logits = logits.detach().double().cpu()
    names = [str(n) for n in (names if names is not None else range(logits.shape[-1]))]
    _check_fittable(logits, targets, multi_label, names)
    if not multi_label:
        log_t = _minimise(lambda p: F.cross_entropy(logits / p.exp(), targets.long().cpu()), 1)
        return _checked(Calibration((math.exp(-float(log_t)),)), names)
    targets = targets.double().cpu()
    n = len(logits)

    def nll(scale: Tensor, bias: Tensor | float) -> Tensor:  # (K,) sums over images
        z = logits * scale + bias
        return F.binary_cross_entropy_with_logits(z, targets, reduction="none").sum(0)

    log_s = _minimise(lambda p: nll(p.exp(), 0.0).sum(), logits.shape[1])
    platt = _minimise(lambda p: nll(p[0].exp(), p[1]).sum(), (2, logits.shape[1]))
    temperature_nll, platt_nll = nll(log_s.exp(), 0.0), nll(platt[0].exp(), platt[1])
    use_platt = 2 * (temperature_nll - platt_nll) > math.log(n)  # BIC: one parameter more
    scale = torch.where(use_platt, platt[0].exp(), log_s.exp())
    bias = torch.where(use_platt, platt[1], torch.zeros_like(platt[1]))
    fit = Calibration(
        tuple(scale.tolist()), tuple(bias.tolist()) if bool(use_platt.any()) else None
    )
    return _checked(fit, names)


def _check_fittable(logits: Tensor, targets: Tensor, multi_label: bool, names: list[str]) -> None:
    if len(logits) == 0:
        raise CalibrationError("no validation images to calibrate on")
    bad = (~logits.isfinite()).any(0).nonzero().flatten().tolist()
    if bad:
        raise CalibrationError(
            f"the model's outputs for {', '.join(names[i] for i in bad[:5])} are not finite "
            "(NaN or infinite) on some validation images; fix or retrain the model before "
            "calibrating it"
        )
    if multi_label:
        single = few_positives(targets, names, fewer_than=1)
        if single:
            raise CalibrationError(
                f"label(s) {', '.join(single)} have one class only in the validation images "
                "(every image has them, or none has): their calibration and threshold cannot be "
                "fitted; add images of the other class"
            )
    elif targets.unique().numel() < 2:
        raise CalibrationError(
            f"all {len(targets)} validation images are of one class "
            f"({names[int(targets.flatten()[0])]}): a temperature cannot be fitted on them; "
            "calibrate on images of two classes or more"
        )


def _checked(fit: Calibration, names: list[str]) -> Calibration:
    """``fit`` if, in the float32 that ``Calibration.apply`` computes in, every scale is finite
    and positive and every bias finite."""
    scale = torch.tensor(fit.scale, dtype=torch.float32)
    bias = torch.tensor(fit.bias or [0.0] * len(scale), dtype=torch.float32)
    bad = ~(scale.isfinite() & (scale > 0) & bias.isfinite())
    if bool(bad.any()):
        which = [n for n, b in zip(names, bad.tolist()) if b] if len(scale) > 1 else ["the model"]
        raise CalibrationError(
            f"the calibration of {', '.join(which)} diverged (a temperature or bias that is not "
            "a finite float32); check the model's outputs and the validation labels"
        )
    return fit


def _minimise(loss, shape: int | tuple[int, ...]) -> Tensor:
    """The parameters (zeros to start) minimising a smooth convex ``loss``, by L-BFGS in float64."""
    params = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [params], lr=1, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimiser.zero_grad()
        value = loss(params)
        value.backward()
        return value

    optimiser.step(closure)
    return params.detach()


@dataclass(frozen=True)
class ThresholdRule:
    """How a label's threshold is chosen: ``f1`` (the best F1), ``youden`` (the best sensitivity +
    specificity - 1), ``sensitivity=S`` (the highest threshold whose sensitivity is >= S) or
    ``precision=P`` (the lowest threshold whose precision is >= P).

    A sensitivity or precision target is met with 95% confidence, not just on the validation
    images: the one-sided Wilson lower bound of the rate must reach it, so that new images like
    them meet it too (with 200 positives, sensitivity=0.9 needs about 0.935 on the validation
    images). Where no threshold can promise it (too few images), the most lenient (sensitivity)
    or strictest (precision) is taken, and ``unpromised`` names those labels; a target of 1, which no finite number of images can
    promise, is refused."""

    kind: str
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> ThresholdRule:
        match = re.fullmatch(
            r"(f1|youden)|(sensitivity|precision)=([0-9]+\.?[0-9]*|\.[0-9]+)", text.strip()
        )
        target = float(match.group(3)) if match and match.group(3) else None
        if match is None or (target is not None and not 0 < target < 1):
            raise CalibrationError(
                f"threshold rule {text!r}: use f1, youden, sensitivity=S or precision=P "
                "(S, P in (0, 1): a rate of 1 cannot be promised from finitely many images)"
            )
        return cls(match.group(1) or match.group(2), target)

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


def choose_thresholds(
    probabilities: Tensor, targets: Tensor, rule: ThresholdRule
) -> tuple[float, ...]:
    """Each label's threshold on its (N, L) calibrated ``probabilities`` by ``rule``; a label
    is positive when its probability is at least the threshold."""
    return tuple(
        _threshold(probabilities[:, j].double(), targets[:, j].bool(), rule)
        for j in range(probabilities.shape[1])
    )


def _threshold(scores: Tensor, positive: Tensor, rule: ThresholdRule) -> float:
    """One label: every distinct score is a candidate threshold; counts at each by cumulative
    sums over the scores in decreasing order."""
    order = scores.argsort(descending=True)
    scores, positive = scores[order], positive[order]
    last = torch.ones_like(scores, dtype=torch.bool)  # the last of each run of equal scores
    last[:-1] = scores[1:] != scores[:-1]
    tp = positive.double().cumsum(0)[last]
    fp = (~positive).double().cumsum(0)[last]
    candidates = scores[last]
    positives, negatives = max(float(positive.sum()), 1.0), max(float((~positive).sum()), 1.0)
    if rule.kind == "f1":
        best = int((2 * tp / (tp + fp + positives)).argmax())
    elif rule.kind == "youden":
        best = int((tp / positives - fp / negatives).argmax())
    elif rule.kind == "sensitivity":  # grows as the threshold falls: the first that meets it
        meets = (wilson_lower_bound(tp, positives) >= rule.target).nonzero()
        best = int(meets[0]) if len(meets) else len(candidates) - 1
    else:  # precision: the lowest threshold that meets it, else the highest one
        meets = (wilson_lower_bound(tp, tp + fp) >= rule.target).nonzero()
        best = int(meets[-1]) if len(meets) else 0
    return float(candidates[best])


def unpromised(
    probabilities: Tensor, targets: Tensor, thresholds: Sequence[float], rule: ThresholdRule
) -> list[int]:
    """The labels (indices) whose ``thresholds`` on (N, L) ``probabilities`` do not promise
    ``rule``'s sensitivity or precision with 95% confidence: too few images for it, so that
    ``choose_thresholds`` fell back on its last resort."""
    if rule.target is None:
        return []
    called = probabilities.double() >= torch.tensor(thresholds, dtype=torch.float64)
    actual = targets.bool()
    hits = (called & actual).sum(0).double()
    trials = (actual if rule.kind == "sensitivity" else called).sum(0).double()
    return (wilson_lower_bound(hits, trials) < rule.target).nonzero().flatten().tolist()


def wilson_lower_bound(successes: Tensor, trials: Tensor | float, z: float = 1.645) -> Tensor:
    """The one-sided lower confidence bound (95% for ``z`` = 1.645) of a rate
    ``successes / trials`` (Wilson's score interval)."""
    n = torch.as_tensor(trials, dtype=torch.float64).clamp(min=1)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def calibration_metrics(
    probabilities: Tensor, targets: Tensor, multi_label: bool, names: Sequence[str]
) -> dict[str, Any]:
    """Expected calibration error (``BINS`` equal-width bins), Brier score and negative
    log-likelihood of (N, K) ``probabilities``: overall, and per label for a multi-label model
    (overall = the mean over labels). Single-label ECE is over the top class's confidence."""
    p = probabilities.double().cpu().clamp(1e-12, 1 - 1e-12)
    if not multi_label:
        y = targets.long().cpu()
        confidence, predicted = p.max(1)
        onehot = F.one_hot(y, p.shape[1]).double()
        return {
            "ece": _ece(confidence, (predicted == y).double()),
            "brier": float(((p - onehot) ** 2).sum(1).mean()),
            "nll": float(-p.gather(1, y[:, None]).log().mean()),
        }
    y = targets.double().cpu()
    labels = {
        name: {
            "ece": _ece(p[:, j], y[:, j]),
            "brier": float(((p[:, j] - y[:, j]) ** 2).mean()),
            "nll": float(F.binary_cross_entropy(p[:, j], y[:, j])),
            "positives": int(y[:, j].sum()),
        }
        for j, name in enumerate(names)
    }
    overall = {
        key: sum(label[key] for label in labels.values()) / len(labels)
        for key in ("ece", "brier", "nll")
    }
    return {**overall, "labels": labels}


def _ece(confidence: Tensor, outcome: Tensor) -> float:
    return ece_of_bins(bin_sums(confidence, outcome))


def bin_sums(confidence: Tensor, outcome: Tensor) -> Tensor:
    """(3, ``BINS``) float64 sums per confidence bin of [0, 1] (equal widths): the count, the
    confidences and the outcomes (1 right, 0 wrong). Sums over batches or processes add up."""
    confidence, outcome = confidence.detach().double(), outcome.detach().double()
    index = (confidence * BINS).long().clamp(0, BINS - 1)
    sums = torch.zeros(3, BINS, dtype=torch.float64, device=confidence.device)
    for row, values in enumerate((torch.ones_like(outcome), confidence, outcome)):
        sums[row].index_add_(0, index, values)
    return sums


def ece_of_bins(sums: Tensor) -> float:
    """Expected calibration error of ``bin_sums``: the mean over images of |confidence -
    observed frequency| in their bin."""
    return float((sums[1] - sums[2]).abs().sum() / sums[0].sum().clamp(min=1))


def _bins(confidence: Tensor, outcome: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per bin: the count, the mean confidence and the observed frequency of the outcome."""
    counts, confidences, outcomes = bin_sums(confidence.cpu(), outcome.cpu())
    return counts, confidences / counts.clamp(min=1), outcomes / counts.clamp(min=1)


def few_positives(
    targets: Tensor, names: Sequence[str], fewer_than: int = FEW_POSITIVES
) -> list[str]:
    """The labels of (N, L) 0/1 ``targets`` with fewer than ``fewer_than`` positives or
    negatives: their calibration and thresholds rest on too few images (none: on one class)."""
    positives = targets.sum(0)
    negatives = len(targets) - positives
    return [
        name
        for name, pos, neg in zip(names, positives.tolist(), negatives.tolist())
        if min(pos, neg) < fewer_than
    ]


def reliability_diagram(curves: dict[str, tuple[Tensor, Tensor]], title: str = "reliability"):
    """A PIL image (to save as PNG) of observed frequency against confidence per bin, one
    coloured line per ``name -> (confidence, outcome)`` (e.g. before and after calibration),
    over the diagonal of perfect calibration."""
    from PIL import Image, ImageDraw

    size, margin = 480, 48
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    span = size - 2 * margin

    def point(x: float, y: float) -> tuple[float, float]:
        return margin + x * span, size - margin - y * span

    draw.rectangle([point(0, 1), point(1, 0)], outline="black")
    draw.line([point(0, 0), point(1, 1)], fill=(170, 170, 170), width=1)
    for tick in range(0, 11, 2):
        x, y = point(tick / 10, 0)
        draw.text((x - 8, y + 6), f"{tick / 10:.1f}", fill="black")
        x, y = point(0, tick / 10)
        draw.text((x - 30, y - 6), f"{tick / 10:.1f}", fill="black")
    draw.text((margin, 8), title, fill="black")
    draw.text((size / 2 - 30, size - 20), "confidence", fill="black")
    draw.text((margin, margin - 14), "observed frequency", fill="black")
    colours = [(200, 60, 40), (40, 90, 200), (40, 160, 70), (140, 60, 160)]
    for k, (name, (confidence, outcome)) in enumerate(curves.items()):
        counts, mean_confidence, frequency = _bins(confidence, outcome)
        points = [
            point(float(c), float(f))
            for c, f, n in zip(mean_confidence, frequency, counts)
            if n > 0
        ]
        colour = colours[k % len(colours)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((margin + 8, margin + 8 + 14 * k), name, fill=colour)
    return image
