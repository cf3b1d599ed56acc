"""Image transforms: the evaluation pipeline of the PyTorch Hub page (PIL image -> normalised
tensor) and the constants it uses."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (grayscale, palette, RGBA, CMYK...) as RGB; RGB images pass unchanged."""
    return image if image.mode == "RGB" else image.convert("RGB")


def eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """PIL image -> (3, crop_size, crop_size) float tensor: RGB, resize the shorter side to
    ``resize_size`` (bilinear, antialiased), center crop, scale to [0, 1], normalise."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.Resize(resize_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(crop_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
