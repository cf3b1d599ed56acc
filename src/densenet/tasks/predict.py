"""Classify images: paths, bytes, PIL images or tensors in; top-k (label, probability) out.
A volume model (``ModelCard.volume``) classifies volume files (NIfTI, ``.npy``) the same way.

Images are decoded and checked one by one, so a broken image reports its own error while the
good ones in the same call are still classified.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.functional import to_pil_image

from densenet.data.files import atomic_write
from densenet.data.images import (
    ImageError,
    ImageInput,
    Reason,
    check_pixels,
    describe,
    open_image,
)
from densenet.data.transforms import ChannelError
from densenet.data.volumes import VOLUME_SUFFIXES, file_stem, is_volume_file, read_volume, write_map
from densenet.deprecation import renamed_keywords
from densenet.infer.load import load
from densenet.infer.runner import Runner
from densenet.infer.runtime import resolve_device
from densenet.tasks.overlays import heat_overlay, slices_overlay
from densenet.weights.published import WeightsArg

__all__ = ["Classifier", "Explanation", "ImageError", "Prediction", "top_predictions"]


@dataclass
class Prediction:
    """The top-k of one image, or the error that stopped it."""

    source: str
    labels: list[str]
    indices: list[int]
    probabilities: list[float]
    error: str | None = None
    reason: Reason | None = None  # why ``error``, for programs
    positive: list[str] | None = None  # a multi-label model's labels at or above threshold

    @property
    def top(self) -> list[tuple[str, float]]:
        return list(zip(self.labels, self.probabilities))

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            reason = self.reason.value if self.reason is not None else None
            return {"source": self.source, "error": self.error, "reason": reason}
        top = zip(self.labels, self.indices, self.probabilities)
        result: dict[str, Any] = {
            "source": self.source,
            "top": [{"label": n, "index": i, "probability": p} for n, i, p in top],
        }
        if self.positive is not None:
            result["positive"] = self.positive
        return result


@dataclass
class Explanation:
    """Where the network looked for one class in one image or volume (``Classifier.explain``).

    ``cam``: (H, W) float32 class activation map on the grid of ``view``, the resized,
    center-cropped image the network saw (a volume model: (D, H, W) on the grid of ``view``,
    the (C, D, H, W) volume the network saw); ``label``/``index``/``probability``: the class.
    """

    source: str
    label: str
    index: int
    probability: float
    cam: Tensor
    view: Image.Image | Tensor

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The map as a heat map over ``view`` (a volume's: over its three central slices,
        ``densenet.tasks.overlays.slices_overlay``), labelled with the class and its probability."""
        label = f"{self.label} {self.probability:.1%}"
        if isinstance(self.view, Tensor):
            return slices_overlay(self.view, self.cam, label, alpha)
        return heat_overlay(self.view, self.cam, label, alpha)


def top_predictions(
    sources: Sequence[str], probabilities: Tensor, topk: int, classes: Sequence[str]
) -> list[Prediction]:
    """One ``Prediction`` per row of ``probabilities`` (N, num_classes): its ``topk`` classes,
    most probable first."""
    top_p, top_i = probabilities.topk(topk, dim=1)
    return [
        Prediction(source, [classes[k] for k in i], i, p)
        for source, p, i in zip(sources, top_p.tolist(), top_i.tolist())
    ]


@renamed_keywords(calibration="calibration_images")
class Classifier:
    """An image classifier: the model's preprocessing, top-k probabilities (softmax, or sigmoids
    for a multi-label model), its class names.

    Args:
        model: anything ``densenet.load`` takes: an architecture name, a training checkpoint,
            an exported ``.onnx``/``.pt2``/TorchScript file, a module; None (the default):
            the training checkpoint ``weights`` names, else ``densenet121``.
        weights: as for the builders (``"DEFAULT"``, a name, an entry or a local file); ignored
            when ``model`` is a module or an exported file.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        categories: class names; default the model card's.
        batch_size: images per forward pass.
        optimize: run a DenseNet in its fast inference form (``densenet.optimize``); False runs
            the module as given.
        dtype: the fast form's precision: a ``torch.dtype``, a name (``"float32"``,
            ``"bfloat16"``, ``"float16"``), ``"auto"`` (bfloat16 where the hardware computes it
            natively), ``"int8"`` (quantized on the CPU, calibrated on ``calibration_images``, a
            folder of images), or None: float32 on CPU (exact), bfloat16 on CUDA.
        backend: the fast form's engine (``densenet.optimize``'s ``backend``: ``"onednn"``,
            ``"openvino"``...); None: the fastest measured for the device and precision
            (``densenet.infer.engines``).
        buckets: run the model only at batch sizes 1, 2, 4, ..., ``batch_size`` (a batch is
            padded up and the padding rows dropped), replaying one CUDA graph per size; default
            on for an optimized DenseNet on CUDA, where it keeps shapes static and launches
            cheap. ``warm_up()`` captures every size ahead of the first images.
        tta: test-time augmentation (``densenet.data.transforms.VIEWS``): ``"hflip"``,
            ``"five-crop"`` or ``"ten-crop"`` average each image's probabilities over that many
            views (and cost that many forward passes); None, one view.
        calibration_images: with ``dtype="int8"``, the folder of images the quantization is
            calibrated on; ``calibration=`` is its deprecated spelling.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module | None = None,
        weights: WeightsArg = "DEFAULT",
        device: str | torch.device = "auto",
        *,
        categories: Sequence[str] | None = None,
        batch_size: int = 32,
        progress: bool = True,
        optimize: bool = True,
        dtype: torch.dtype | str | None = None,
        backend: str | None = None,
        buckets: bool | None = None,
        tta: str | None = None,
        calibration_images: str | os.PathLike | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        loaded = load(model, weights=weights, device=device, progress=progress)
        self.card = loaded.card
        if categories is not None:
            self.card = self.card.replace(classes=tuple(categories))
        self.device = resolve_device(device)
        self.runner = Runner(
            dataclasses.replace(loaded, card=self.card),
            self.device,
            optimize=optimize,
            dtype=dtype,
            backend=backend,
            batch_size=batch_size,
            buckets=buckets,
            calibration_images=calibration_images,
        )
        self.categories = list(self.card.classes)
        self.preprocessing = self.card.preprocessing
        self.transform = self.card.transform()
        self.views = self.card.transform(tta) if tta is not None else None
        self.min_size = self.preprocessing.min_size
        self._view_transform = self.preprocessing.view_transform()
        self._view_to_input = self.preprocessing.view_to_input()
        self.batch_size = batch_size

    @property
    def model(self) -> nn.Module:
        """What runs: the module (or its bucketed inference form)."""
        return self.runner.module

    def warm_up(self) -> None:
        """Run the model once at every batch size it will see, so compilation, autotuning and
        graph capture happen before the first real images."""
        self.runner.warm_up()

    def preprocess(self, image: ImageInput, name: str) -> Tensor:
        """One image -> (C, H, W) model input, or (V, C, H, W) test-time views (``tta``); for a
        volume model, a volume file's path -> (C, D, H, W). A float tensor is taken as already
        preprocessed (one view); a uint8 tensor (C, H, W) as a decoded image. The network's
        smallest input is checked on the result, not on the image (which the transform
        resizes)."""
        if isinstance(image, Tensor) and image.is_floating_point():
            return self.card.check_input(image, name)
        if self.card.volume is not None:
            return self.card.check_input(self.transform(self._read_volume(image, name)), name)
        if self.views is None:
            return self.card.check_input(self.transform(self._decode(image, name)), name)
        views = self.views(self._decode(image, name))
        self.card.check_input(views[0], name)
        return views

    def _read_volume(self, source: ImageInput, name: str) -> Tensor:
        """A volume file's path -> its (C, D, H, W) voxels, checked."""
        if not isinstance(source, (str, os.PathLike)):
            raise ImageError(
                f"{name}: this model takes volumes: give the path of a volume file "
                f"({', '.join(VOLUME_SUFFIXES)})",
                Reason.NOT_AN_IMAGE,
            )
        return read_volume(source, self.card.in_channels).data

    def _decode(self, image: ImageInput, name: str) -> Image.Image:
        """A path, bytes, PIL image or uint8 (C, H, W) tensor -> a checked PIL image."""
        if isinstance(image, Tensor):
            if image.is_floating_point():
                raise ValueError(
                    f"{name}: a float tensor is taken as preprocessed; explain() needs the image "
                    "(for a preprocessed batch use densenet.explain(model, batch))"
                )
            image = to_pil_image(image)
        elif not isinstance(image, Image.Image):
            image = open_image(image)
        check_pixels(image, name)
        return image

    def explain(
        self, images: ImageInput | Sequence[ImageInput], target: int | str | None = None
    ) -> list[Explanation]:
        """Each image's class activation map (``densenet.explain``) for ``target`` (a class index
        or name; default: the image's most probable class as ``classify`` gives it, with ``tta``
        the views' average; the map is the center crop's). Images are paths, bytes, PIL images
        or uint8 tensors (a volume model: volume files); raises ``ImageError`` naming the first
        one that cannot be read."""
        images = _as_list(images)
        if isinstance(target, str) and target not in self.categories:
            shown = ", ".join(self.categories[:10])
            more = f" and {len(self.categories) - 10} more" if len(self.categories) > 10 else ""
            raise ValueError(f"unknown class {target!r}; the model's classes: {shown}{more}")
        index = self.categories.index(target) if isinstance(target, str) else target
        if index is not None and not 0 <= index < len(self.categories):
            raise ValueError(f"class index {index} is not in 0..{len(self.categories) - 1}")
        results: list[Explanation] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            names = [describe(image, start + i) for i, image in enumerate(chunk)]
            views = [self._view(image, name) for image, name in zip(chunk, names)]
            batch = torch.stack([self._view_input(v) for v in views])
            out = self.runner.activation_maps(batch)
            probabilities = self.card.probabilities(out.logits)
            if self.views is not None:  # the printed class and probability: the views' average
                inputs = torch.stack([self.preprocess(i, n) for i, n in zip(chunk, names)])
                probabilities = self.probabilities(inputs).to(probabilities.device)
            chosen = (
                probabilities.argmax(1)
                if index is None
                else torch.full((len(views),), index, device=probabilities.device)
            )
            cams = out.select(chosen, batch.shape[2:]).cpu()
            for i, (name, picture, k) in enumerate(zip(names, views, chosen.tolist())):
                p = float(probabilities[i, k])
                results.append(Explanation(name, self.categories[k], k, p, cams[i], picture))
        return results

    def _view(self, image: ImageInput, name: str) -> Image.Image | Tensor:
        """What the network sees of ``image``: the resized, center-cropped picture (a volume
        model: the network input itself)."""
        if self.card.volume is not None:
            return self.preprocess(image, name)
        return self._view_transform(self._decode(image, name))

    def _view_input(self, view: Image.Image | Tensor) -> Tensor:
        """A ``_view`` -> the network input."""
        return view if isinstance(view, Tensor) else self._view_to_input(view)

    def _inputs(self, images: Sequence[ImageInput]) -> Iterator[tuple[str, Tensor | ImageError]]:
        for i, image in enumerate(images):
            name = describe(image, i)
            try:
                yield name, self.preprocess(image, name)
            except ImageError as error:
                yield name, error
            except ChannelError as error:  # e.g. a colour image for a grey model
                yield name, ImageError(f"{name}: {error}", Reason.BAD_SHAPE)

    def logits(self, batch: Tensor) -> Tensor:
        """(N, C, H, W) preprocessed images -> (N, num_classes) float32 logits."""
        return self.runner.logits(batch)

    def probabilities(self, batch: Tensor) -> Tensor:
        """(N, C, H, W) preprocessed images, or (N, V, C, H, W) views of each -> (N,
        num_classes) probabilities on the CPU (``Runner.probabilities``)."""
        return self.runner.probabilities(batch).cpu()

    def classify(
        self, images: ImageInput | Sequence[ImageInput], topk: int = 5
    ) -> list[Prediction]:
        """Top-k of each image, in order; a bad image gets a ``Prediction`` with its ``error``."""
        images = _as_list(images)
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        topk = min(topk, len(self.categories))
        results: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            inputs = list(self._inputs(images[start : start + self.batch_size]))
            chunk = [
                Prediction(name, [], [], [], str(item), getattr(item, "reason", None))
                for name, item in inputs
            ]
            for shape in {item.shape for _, item in inputs if isinstance(item, Tensor)}:
                slots = [
                    i
                    for i, (_, t) in enumerate(inputs)
                    if isinstance(t, Tensor) and t.shape == shape
                ]
                probs = self.probabilities(torch.stack([inputs[i][1] for i in slots]))
                names = [inputs[i][0] for i in slots]
                predictions = top_predictions(names, probs, topk, self.categories)
                if self.card.multi_label:
                    for prediction, labels in zip(predictions, self.card.positive(probs)):
                        prediction.positive = labels
                for slot, prediction in zip(slots, predictions):
                    chunk[slot] = prediction
            results += chunk
        return results

    def predict(
        self, images: ImageInput | Sequence[ImageInput], topk: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Per image, the top-k ``(label, probability)`` pairs, most probable first.
        Raises ``ImageError`` naming the first image that cannot be classified."""
        predictions = self.classify(images, topk)
        for prediction in predictions:
            if prediction.error is not None:
                raise ImageError(prediction.error, prediction.reason or Reason.CORRUPT)
        return [p.top for p in predictions]


def write_overlays(
    explanations: Sequence[Explanation], folder: str | os.PathLike
) -> list[dict[str, Path]]:
    """Save each explanation's ``overlay()`` as ``folder/<file stem>.cam.png`` (``cam``), or
    ``<stem>-2.cam.png``, ``-3``... when that name is taken (by a file already there or written
    earlier in the call: a map never replaces a file); for a volume, also the map itself as
    ``<stem>.cam.nii.gz`` (``cam``; the picture is then ``cam_slices``), aligned with the volume
    file it was computed on (``densenet.data.volumes.write_map``). Returns the paths of each, in
    order, all distinct."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Path]] = []
    for explanation in explanations:
        suffixes = (
            (".cam.png", ".cam.nii.gz") if isinstance(explanation.view, Tensor) else (".cam.png",)
        )
        stem = base = file_stem(explanation.source)
        copy = 1
        while any(os.path.lexists(folder / f"{stem}{suffix}") for suffix in suffixes):
            copy += 1
            stem = f"{base}-{copy}"
        picture = folder / f"{stem}.cam.png"
        atomic_write(picture, lambda tmp, e=explanation: e.overlay().save(tmp, format="PNG"))
        if not isinstance(explanation.view, Tensor):
            written.append({"cam": picture})
            continue
        source = explanation.source
        like = source if is_volume_file(source) and os.path.isfile(source) else None
        nifti = write_map(explanation.cam, like, folder / f"{stem}.cam.nii.gz")
        written.append({"cam": nifti, "cam_slices": picture})
    return written


def _as_list(images: ImageInput | Sequence[ImageInput]) -> Sequence[ImageInput]:
    """One image, a sequence of images or an (N, C, H, W) batch -> a sequence of images."""
    if isinstance(images, Tensor) and images.dim() == 4:
        return list(images)
    if not isinstance(images, (list, tuple)):
        return [images]
    return images
