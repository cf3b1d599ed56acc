"""What a model needs and what its outputs mean, described once: ``Preprocessing`` (the evaluation
transform's constants and the smallest input the network accepts) inside a ``ModelCard`` (class
names, multi-label or not, input channels; for a volume model, its ``VolumeTransform``). Weights
entries, training checkpoints and exported files all carry a card; ``densenet.load`` returns one
beside every module. A card's ``Calibration`` (fitted by
``densenet.tasks.calibration``) maps the logits before its softmax or sigmoid."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from densenet.architectures import min_input_size, model_config
from densenet.data.images import ImageError, Reason
from densenet.data.labels import imagenet_classes
from densenet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    channel_stats,
    eval_transform,
    to_input,
    view_transform,
    views_transform,
)
from densenet.data.volumes import VolumeTransform

__all__ = ["DEFAULT_VOLUME_SIZE", "Calibration", "ModelCard", "Preprocessing", "default_classes"]

DEFAULT_VOLUME_SIZE = (96, 96, 96)  # (D, H, W) voxels, for 3D models without a card
DEFAULT_MIN_SIDE = min_input_size(model_config("densenet121"))  # the default DenseNet's, pixels


@dataclass(frozen=True)
class Calibration:
    """Calibrated logits ``z * scale + bias``, per output: ``scale`` has one value for a
    single-label model (1 / temperature) or one per label; ``bias`` is None or one per label."""

    scale: tuple[float, ...]
    bias: tuple[float, ...] | None = None

    def apply(self, logits: Tensor) -> Tensor:
        """(N, K) logits -> (N, K) calibrated logits, in float32."""
        z = logits.float() * torch.tensor(self.scale, device=logits.device)
        return z if self.bias is None else z + torch.tensor(self.bias, device=logits.device)

    @property
    def temperatures(self) -> list[float]:
        return [1 / s for s in self.scale]


@dataclass(frozen=True)
class Preprocessing:
    """PIL image -> network input: resize the shorter side to ``resize_size`` (pixels, with
    ``interpolation``), center-crop ``crop_size``, scale to [0, 1], normalise with ``mean`` and
    ``std`` (per channel). ``min_size`` (height, width) is the smallest input the network takes.
    ``value_scale`` says how pixel values reach [0, 1]: divided by the largest value of their bit
    depth (255; 65535 for a 16-bit grey image, ``densenet.data.transforms.to_8bit``)."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    min_size: tuple[int, int] = (DEFAULT_MIN_SIDE, DEFAULT_MIN_SIDE)
    value_scale: str = "bit depth"

    def transform(self) -> Callable[[Any], Tensor]:
        """PIL image -> (C, crop_size, crop_size) float tensor."""
        return eval_transform(
            self.resize_size, self.crop_size, self.mean, self.std, self.interpolation
        )

    def view_transform(self) -> Callable[[Any], Any]:
        """PIL image -> the resized, center-cropped PIL image that ``transform`` normalises."""
        return view_transform(self.resize_size, self.crop_size, self.channels, self.interpolation)

    def tensor_transform(self) -> Callable[[Tensor], Tensor]:
        """(C, H, W) uint8 image tensor (on any device) -> the (C, crop_size, crop_size) float
        tensor ``transform`` gives for the same pixels, up to the resize's rounding (a tensor
        resize, antialiased as PIL's)."""
        return functools.partial(tensor_to_input, pre=self)

    def view_to_input(self) -> Callable[[Any], Tensor]:
        """``view_transform``'s PIL image -> the (C, crop_size, crop_size) tensor ``transform``
        gives: ``transform == view_to_input . view_transform``."""
        return to_input(self.mean, self.std)

    def views_transform(self, views: str) -> Callable[[Any], Tensor]:
        """PIL image -> (V, C, crop_size, crop_size): the views of test-time augmentation
        (``densenet.data.transforms.VIEWS``: hflip, five-crop, ten-crop)."""
        return views_transform(
            views, self.resize_size, self.crop_size, self.mean, self.std, self.interpolation
        )

    def check_input(self, x: Tensor, name: str) -> Tensor:
        """``x`` if it is a (C, H, W) network input of ``channels`` channels and at least
        ``min_size``, else ``ImageError``."""
        height, width = self.min_size
        if x.dim() != 3 or x.shape[-2] < height or x.shape[-1] < width:
            raise ImageError(
                f"{name}: input of shape {tuple(x.shape)} is not a (C, H, W) tensor of at least "
                f"{height}x{width} (smaller than the model's minimum)",
                Reason.BAD_SHAPE,
            )
        if x.shape[0] != self.channels:
            raise ImageError(
                f"{name}: input of shape {tuple(x.shape)} has {x.shape[0]} channels, the model "
                f"takes {self.channels}",
                Reason.BAD_SHAPE,
            )
        return x

    @property
    def channels(self) -> int:
        """Image channels: one per mean."""
        return len(self.mean)

    def for_channels(self, channels: int) -> Preprocessing:
        """The same preprocessing for ``channels`` input channels (``channel_stats``)."""
        if channels == self.channels:
            return self
        mean, std = channel_stats(self.mean, channels), channel_stats(self.std, channels)
        return dataclasses.replace(self, mean=mean, std=std)

    def with_crop(self, crop_size: int) -> Preprocessing:
        """The same preprocessing for another crop size, resized in the same ratio."""
        resize = round(crop_size * self.resize_size / self.crop_size)
        return dataclasses.replace(self, resize_size=resize, crop_size=crop_size)


def tensor_to_input(image: Tensor, pre: Preprocessing) -> Tensor:
    """``Preprocessing.tensor_transform`` of ``image`` (C, H, W) uint8."""
    mode = TF.InterpolationMode(pre.interpolation)
    image = TF.resize(image, [pre.resize_size], mode, antialias=True)
    image = TF.center_crop(image, [pre.crop_size])
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), pre.mean, pre.std)


def default_classes(num_classes: int) -> tuple[str, ...]:
    """ImageNet's names for 1000 classes, else ``class 0``, ``class 1``..."""
    if num_classes == 1000:
        return tuple(imagenet_classes())
    return tuple(f"class {i}" for i in range(num_classes))


@dataclass(frozen=True)
class ModelCard:
    """Everything besides the weights that using a model takes.

    Args:
        classes: the name of each output, in index order.
        preprocessing: the input transform the model was trained or measured with.
        multi_label: outputs are independent (sigmoid) rather than one softmax.
        in_channels: image channels the network takes.
        thresholds: a multi-label model's per-label decision thresholds on the probabilities
            (None: 0.5 each).
        calibration: the map of the logits fitted by ``densenet calibrate`` (temperature or
            Platt scaling) that ``probabilities`` applies; None: the logits as they are.
        arch: the registry name, None for a custom configuration.
        weights: where the weights came from (an entry name or a file name), None for random.
        volume: a volume model's input (``VolumeTransform``: size and intensity scale); its
            inputs are then volume files, not images, and ``preprocessing`` is unused.
    """

    classes: tuple[str, ...]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    multi_label: bool = False
    in_channels: int = 3
    thresholds: tuple[float, ...] | None = None
    arch: str | None = None
    weights: str | None = None
    calibration: Calibration | None = None
    volume: VolumeTransform | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One network input's shape: (C, D, H, W) for a volume model, else (C, H, W)."""
        if self.volume is not None:
            return (self.in_channels, *self.volume.size)
        side = self.preprocessing.crop_size
        return (self.in_channels, side, side)

    def check_input(self, x: Tensor, name: str) -> Tensor:
        """``x`` if it is one network input (``Preprocessing.check_input`` for an image model; a
        (C, D, H, W) volume of ``in_channels`` channels for a volume model), else ``ImageError``."""
        if self.volume is None:
            return self.preprocessing.check_input(x, name)
        if x.dim() != 4 or x.shape[0] != self.in_channels:
            raise ImageError(
                f"{name}: input of shape {tuple(x.shape)} is not a ({self.in_channels}, D, H, W) "
                "volume",
                Reason.BAD_SHAPE,
            )
        return x

    def transform(self, views: str | None = None) -> Callable[[Any], Tensor]:
        """What a file holds (a PIL image; a volume model: (C, D, H, W) voxels) -> the network
        input: ``preprocessing.transform()``, or the ``volume`` transform; with ``views`` (test-
        time augmentation, ``densenet.data.transforms.VIEWS``), an image's (V, C, H, W) views
        (``ValueError`` for a volume model)."""
        if views is not None and self.volume is not None:
            raise ValueError("test-time views (tta) are of images; this model takes volumes")
        if views is not None:
            return self.preprocessing.views_transform(views)
        return self.volume if self.volume is not None else self.preprocessing.transform()

    def probabilities(self, logits: Tensor) -> Tensor:
        """(N, num_classes) logits -> float32 probabilities: the calibration, then a softmax, or
        for a multi-label model a sigmoid per label."""
        z = logits.float() if self.calibration is None else self.calibration.apply(logits)
        return z.sigmoid() if self.multi_label else z.softmax(-1)

    def positive(self, probabilities: Tensor) -> list[list[str]]:
        """(N, num_classes) probabilities of a multi-label model -> each row's labels at or
        above their threshold."""
        thresholds = torch.tensor(self.thresholds or (0.5,) * self.num_classes)
        above = probabilities.cpu() >= thresholds
        return [[c for c, yes in zip(self.classes, row) if yes] for row in above.tolist()]

    @classmethod
    def for_model(
        cls, model: nn.Module, classes: Sequence[str] | None = None, **fields: Any
    ) -> ModelCard:
        """The card of a model known only by its configuration: ImageNet names for 1000 classes,
        256/224 preprocessing, or 32/32 for a CIFAR-stem DenseNet (the paper's 32x32 inputs); a
        3D model takes volumes resampled to ``DEFAULT_VOLUME_SIZE``, z-scored."""
        config = getattr(model, "config", {})
        num_classes = int(getattr(model, "num_classes", 1000))
        side = getattr(model, "min_input_size", DEFAULT_MIN_SIDE)
        sizes = (32, 32) if config.get("stem") == "cifar" else (256, 224)
        in_channels = config.get("in_channels", 3)
        preprocessing = Preprocessing(*sizes, min_size=(side, side)).for_channels(in_channels)
        known = {
            "classes": tuple(classes) if classes is not None else default_classes(num_classes),
            "preprocessing": preprocessing,
            "in_channels": in_channels,
            "arch": getattr(model, "arch", None),
        }
        if getattr(model, "spatial_dims", 2) == 3:
            known["volume"] = VolumeTransform(DEFAULT_VOLUME_SIZE)
        return cls(**{**known, **fields})

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists)."""
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """The inverse of ``to_dict``; unknown keys are ignored."""
        pre = dict(data.get("preprocessing", {}))
        for name in ("mean", "std", "min_size"):
            if name in pre:
                pre[name] = tuple(pre[name])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["classes"] = tuple(known["classes"])
        if known.get("thresholds") is not None:
            known["thresholds"] = tuple(known["thresholds"])
        if known.get("calibration") is not None:
            fit = known["calibration"]
            bias = fit.get("bias")
            known["calibration"] = Calibration(
                tuple(fit["scale"]), tuple(bias) if bias is not None else None
            )
        known["preprocessing"] = Preprocessing(
            **{k: v for k, v in pre.items() if k in Preprocessing.__dataclass_fields__}
        )
        if known.get("volume") is not None:
            volume = known["volume"]
            window = volume.get("window")
            known["volume"] = VolumeTransform(
                tuple(volume["size"]), tuple(window) if window is not None else None
            )
        return cls(**known)
