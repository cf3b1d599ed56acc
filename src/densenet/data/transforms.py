"""Image transforms: the evaluation pipeline of the PyTorch Hub page (PIL image -> normalised
tensor) and the constants it uses; the training augmentations of the paper's recipes and the
views of test-time augmentation (the paper's ten crops among them)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from densenet.choices import VIEWS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# the PIL mode of an image with 1, 2, 3 or 4 channels
CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


class ChannelError(ValueError):
    """An image whose channels do not match the model's input channels."""


# PIL modes of 16-bit grey images (``I`` is how older Pillow and some TIFFs hold them)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grey image scaled by its bit depth to 8-bit ``L`` (0..65535 -> 0..255, not
    clipped at 255 as PIL's own conversion does); other modes pass unchanged."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (grayscale, palette, RGBA, CMYK, 16-bit grey...) as RGB; RGB images pass
    unchanged."""
    image = to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """``image`` with ``channels`` bands: any mode as RGB for 3 (``to_rgb``); for 1, 2 or 4 the
    image must have that many bands already (L, LA, RGBA; a palette, 1-bit or 16-bit image is
    expanded first), else ``ChannelError``: a colour image is not silently turned grey."""
    if channels == 3:
        return to_rgb(image)
    if channels not in CHANNEL_MODES:
        raise ChannelError(
            f"a PIL image has 1 to 4 channels, the model takes {channels}; give tensors"
        )
    image = to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    bands = len(image.getbands())
    if bands != channels:
        raise ChannelError(
            f"a {image.mode} image has {bands} channel(s), the model takes {channels} "
            f"(--in-channels {channels}); convert the images or give --in-channels {bands}"
        )
    mode = CHANNEL_MODES[channels]
    return image if image.mode == mode else image.convert(mode)


def channel_stats(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """RGB per-channel statistics (a mean or a std) for ``channels`` input channels: their
    average for one (a grey image), else repeated in turn (R, G, B, R, ...)."""
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[c % len(values)] for c in range(channels))


def _channels(channels: int) -> T.Lambda:
    return T.Lambda(functools.partial(to_channels, channels=channels))


def _resize(size: int, interpolation: str) -> T.Resize:
    """Resize the shorter side to ``size`` with torchvision's ``InterpolationMode(interpolation)``,
    antialiased."""
    return T.Resize(size, interpolation=T.InterpolationMode(interpolation), antialias=True)


def eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> T.Compose:
    """PIL image -> (C, crop_size, crop_size) float tensor, C = ``len(mean)`` channels (see
    ``to_channels``), resize the shorter side to ``resize_size`` (``interpolation``: bilinear,
    bicubic, nearest...; antialiased), center crop, scale to [0, 1], normalise."""
    view = view_transform(resize_size, crop_size, len(mean), interpolation)
    return T.Compose([*view.transforms, *to_input(mean, std).transforms])


def to_input(mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """The view (PIL image, ``view_transform``'s output) -> (C, H, W) float tensor: scale to
    [0, 1], normalise with ``mean`` and ``std``."""
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def view_transform(
    resize_size: int = 256, crop_size: int = 224, channels: int = 3, interpolation: str = "bilinear"
) -> T.Compose:
    """PIL image -> the PIL image ``eval_transform`` turns into a tensor: ``channels`` channels,
    resized and center-cropped (what the network sees, to draw on)."""
    return T.Compose(
        [_channels(channels), _resize(resize_size, interpolation), T.CenterCrop(crop_size)]
    )


# ---- training, and test-time views ------------------------------------------------------

# Per-channel statistics of the training sets, for the paper's "normalise with the channel means
# and standard deviations" (CIFAR). SVHN is only divided by 255 in the paper: mean 0, std 1.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)

# Principal components of ImageNet's RGB pixels: AlexNet's lighting noise, with the values of
# fb.resnet.torch, whose data pipeline the paper's Torch code used.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

AUGMENTATIONS = ("none", "crop-flip", "imagenet")


class Lighting(torch.nn.Module):
    """AlexNet-style PCA lighting noise on a (3, H, W) tensor in [0, 1]: adds
    ``eigvec @ (alpha * eigval)`` to every pixel, ``alpha ~ N(0, alphastd)`` per image."""

    def __init__(self, alphastd: float = 0.1) -> None:
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigval", torch.tensor(IMAGENET_PCA_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(IMAGENET_PCA_EIGVEC))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return image
        alpha = torch.empty(3).normal_(0, self.alphastd)
        rgb = (self.eigvec * alpha * self.eigval).sum(dim=1)
        return image + rgb.view(3, 1, 1)


def train_transform(
    augment: str = "crop-flip",
    crop_size: int = 32,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """PIL image -> (C, crop_size, crop_size) float tensor for training, C = ``len(mean)``.

    ``augment``: ``"none"`` (resize the shorter side to ``crop_size``, center crop, normalise:
    the paper's C10/C100/SVHN), ``"crop-flip"`` (the same, then zero-pad 4 and take a random
    ``crop_size`` crop, random horizontal flip: the paper's C10+/C100+, padding after
    normalisation as in its Torch code), or ``"imagenet"`` (random-resized crop, horizontal flip,
    colour jitter 0.4, lighting noise 0.1, normalise).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if augment == "imagenet":
        rgb = len(mean) == 3  # colour noise (saturation, lighting) needs RGB
        return T.Compose(
            [
                _channels(len(mean)),
                T.RandomResizedCrop(crop_size, antialias=True),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if rgb else 0),
                T.ToTensor(),
                *([Lighting(0.1)] if rgb else []),
                T.Normalize(mean, std),
            ]
        )
    steps = list(eval_transform(crop_size, crop_size, mean, std).transforms)
    if augment == "crop-flip":
        steps += [T.RandomCrop(crop_size, padding=4), T.RandomHorizontalFlip()]
    return T.Compose(steps)


# Test-time augmentation: ``VIEWS`` (densenet.choices) names the views of one image whose
# probabilities are averaged, and their number (the cost: that many forward passes per image).


def views_transform(
    views: str,
    resize_size: int = 256,
    crop_size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> T.Compose:
    """PIL image -> (V, C, crop_size, crop_size), the ``VIEWS[views]`` views of test-time
    augmentation, each normalised: ``"hflip"`` the center crop and its mirror; ``"five-crop"``
    the four corners and the center of the resized image; ``"ten-crop"`` (the paper's) those
    five and their mirrors."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {views!r}")
    crops = {
        "hflip": T.Compose([T.CenterCrop(crop_size), T.Lambda(_with_mirror)]),
        "five-crop": T.FiveCrop(crop_size),
        "ten-crop": T.TenCrop(crop_size),
    }[views]
    return T.Compose(
        [
            _channels(len(mean)),
            _resize(resize_size, interpolation),
            crops,
            StackCrops(T.Compose([T.ToTensor(), T.Normalize(mean, std)])),
        ]
    )


def flatten_views(batch: torch.Tensor, spatial_dims: int = 2) -> tuple[torch.Tensor, int]:
    """(N, C, *spatial) inputs, or (N, V, C, *spatial) test-time views of each (``VIEWS``) ->
    (N * V, C, *spatial) and V (1 without views); ``spatial_dims`` axes per input (3: volumes)."""
    if batch.dim() == spatial_dims + 3:
        return batch.flatten(0, 1), batch.shape[1]
    return batch, 1


def _with_mirror(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    return image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class StackCrops:
    """A sequence of PIL crops -> (len, C, H, W): ``transform`` applied to each, stacked."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.transform(crop) for crop in crops])
