"""Classify images: paths, bytes, PIL images or tensors in; top-k (label, probability) out.

Images are decoded and checked one by one, so a broken image reports its own error while the
good ones in the same call are still classified.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms.functional import to_pil_image

from .inference import optimize as optimize_model
from .labels import imagenet_classes
from .model import DenseNet
from .transforms import default_eval_sizes, eval_transform

ImageInput = Union[str, os.PathLike, bytes, Image.Image, Tensor]  # noqa: UP007

MAX_PIXELS = 100_000_000  # decoded images larger than this are refused (decompression bombs)
# Longer side / shorter side: beyond this, resizing the shorter side to 256 explodes in memory.
MAX_ASPECT_RATIO = 100
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageError(ValueError):
    """An image that cannot be classified; the message names it and says why."""


@dataclass
class Prediction:
    """The top-k of one image, or the error that stopped it."""

    source: str
    labels: list[str]
    indices: list[int]
    probabilities: list[float]
    error: str | None = None

    @property
    def top(self) -> list[tuple[str, float]]:
        return list(zip(self.labels, self.probabilities))

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"source": self.source, "error": self.error}
        top = zip(self.labels, self.indices, self.probabilities)
        return {
            "source": self.source,
            "top": [{"label": n, "index": i, "probability": p} for n, i, p in top],
        }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU. ``"cuda"`` without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device 'cuda' was asked for but no CUDA GPU is available; use --device cpu"
        )
    return device


def describe(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image {index} ({type(image).__name__})"


def open_image(
    source: str | os.PathLike | bytes, formats: Sequence[str] | None = None
) -> Image.Image:
    """Decode a file or bytes fully into an RGB-convertible PIL image, or raise ``ImageError``.
    ``formats``: the PIL format names to accept (default: every format PIL reads)."""
    name = "uploaded image" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(f"{name}: empty (0 bytes)")
            stream = io.BytesIO(source)
        else:
            if os.path.getsize(source) == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")
            stream = open(source, "rb")  # noqa: SIM115 (closed below)
        with stream, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=formats)
            check_pixels(image, name)
            image.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageError(f"{name}: cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: too many pixels (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: corrupt or truncated image ({error})") from None
    return image


def check_pixels(image: Image.Image, name: str, min_size: Sequence[int] = (1, 1)) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,}")
    if width < min_size[1] or height < min_size[0]:
        raise ImageError(
            f"{name}: {width}x{height} pixels is smaller than the model's minimum "
            f"{min_size[1]}x{min_size[0]}"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"{name}: {width}x{height} is wider than {MAX_ASPECT_RATIO}:1")


def find_images(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Paths as given; a directory contributes its image files (by suffix), sorted, recursively."""
    found: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(str(path))
    return found


class Classifier:
    """An image classifier with the PyTorch Hub page's preprocessing and softmax top-k.

    Args:
        model: an architecture name (``densenet.list_models()``), a built ``nn.Module``, or an
            exported ``.onnx`` file (run with ONNX Runtime; class names and preprocessing from its
            metadata).
        weights: as for the builders (``"DEFAULT"``, a name, an entry or a local file); ignored
            when ``model`` is a module or an ONNX file.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        categories: class names; default the weights' (ImageNet for 1000 classes).
        batch_size: images per forward pass.
        optimize: run a DenseNet in its fast inference form (``densenet.optimize``: float32 on
            CPU, bfloat16 on CUDA); False runs the module as given.
    """

    def __init__(
        self,
        model: str | nn.Module = "densenet121",
        weights: Any = "DEFAULT",
        device: str | torch.device = "auto",
        *,
        categories: Sequence[str] | None = None,
        batch_size: int = 32,
        progress: bool = True,
        optimize: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        transform, classes = None, None
        if isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx"):
            from .export import OnnxModel

            model = OnnxModel(model, self.device)
        elif isinstance(model, str):  # a training checkpoint brings its classes and transform
            from .evaluate import load_eval_model

            spec = load_eval_model(model, weights, progress=progress)
            model, classes = spec.model, spec.classes
            transform = eval_transform(spec.resize_size, spec.crop_size, spec.mean, spec.std)
        entry = getattr(model, "weights_entry", None)
        self.model = model.eval().to(self.device)
        if optimize and isinstance(model, DenseNet):
            self.model = optimize_model(self.model)
        num_classes = int(getattr(model, "num_classes", 1000))
        if categories is None:
            categories = classes or (
                entry.categories if entry else _default_categories(num_classes)
            )
        self.categories = list(categories)
        if transform is None:
            transform = entry.transforms() if entry else eval_transform(*default_eval_sizes(model))
        self.transform = transform
        self.min_size = tuple(entry.min_size) if entry is not None else (29, 29)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size

    def preprocess(self, image: ImageInput, name: str) -> Tensor:
        """One image -> (3, H, W) model input. A float tensor is taken as already preprocessed;
        a uint8 tensor (C, H, W) as a decoded image."""
        if isinstance(image, Tensor) and image.is_floating_point():
            if (
                image.dim() != 3
                or image.shape[-2] < self.min_size[0]
                or image.shape[-1] < self.min_size[1]
            ):
                raise ImageError(
                    f"{name}: tensor of shape {tuple(image.shape)} is not a (C, H, W) input of at "
                    f"least {self.min_size[0]}x{self.min_size[1]}"
                )
            return image
        if isinstance(image, Tensor):
            image = to_pil_image(image)
        elif not isinstance(image, Image.Image):
            image = open_image(image)
        check_pixels(image, name, self.min_size)
        return self.transform(image)

    def _inputs(self, images: Sequence[ImageInput]) -> Iterator[tuple[str, Tensor | str]]:
        for i, image in enumerate(images):
            name = describe(image, i)
            try:
                yield name, self.preprocess(image, name)
            except ImageError as error:
                yield name, str(error)

    @torch.inference_mode()
    def logits(self, batch: Tensor) -> Tensor:
        """(N, 3, H, W) preprocessed images -> (N, num_classes) float32 logits."""
        return self.model(batch.to(self.device, non_blocking=True)).float()

    def classify(
        self, images: ImageInput | Sequence[ImageInput], topk: int = 5
    ) -> list[Prediction]:
        """Top-k of each image, in order; a bad image gets a ``Prediction`` with its ``error``."""
        if isinstance(images, Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        topk = min(topk, len(self.categories))
        results: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            inputs = list(self._inputs(images[start : start + self.batch_size]))
            chunk = [Prediction(name, [], [], [], error=item) for name, item in inputs]
            for shape in {item.shape for _, item in inputs if isinstance(item, Tensor)}:
                slots = [
                    i
                    for i, (_, t) in enumerate(inputs)
                    if isinstance(t, Tensor) and t.shape == shape
                ]
                probs = self.logits(torch.stack([inputs[i][1] for i in slots])).softmax(dim=1)
                top_p, top_i = probs.topk(topk, dim=1)
                for slot, p, i in zip(slots, top_p.tolist(), top_i.tolist()):
                    chunk[slot] = Prediction(inputs[slot][0], [self.categories[k] for k in i], i, p)
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
                raise ImageError(prediction.error)
        return [p.top for p in predictions]


def _default_categories(num_classes: int) -> list[str]:
    return imagenet_classes() if num_classes == 1000 else [f"class {i}" for i in range(num_classes)]
