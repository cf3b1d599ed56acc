"""Pictures of class activation maps (``densenet.infer.cam``): ``heat_overlay`` draws a map over
its image as a heat map with the class's label, ``slices_overlay`` a volume's three central slices
with theirs. ``densenet predict --explain`` and the service's ``/explain`` answer with them."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from densenet.data.transforms import to_rgb

__all__ = ["heat_overlay", "slices_overlay"]


def _colormap(values: Tensor) -> Tensor:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8: blue (low) through green to red (high)."""
    red = (1.5 - (4 * values - 3).abs()).clamp(0, 1)
    green = (1.5 - (4 * values - 2).abs()).clamp(0, 1)
    blue = (1.5 - (4 * values - 1).abs()).clamp(0, 1)
    return (torch.stack([red, green, blue], -1) * 255).round().to(torch.uint8)


def heat_overlay(
    image: Image.Image,
    cam: Tensor,
    label: str,
    alpha: float = 0.5,
    limits: tuple[float, float] | None = None,
) -> Image.Image:
    """An RGB picture of ``image`` with ``cam`` (H, W, the image's size) drawn over it as a heat
    map (``limits`` (low, high), default the map's minimum and maximum, blue through red;
    ``alpha`` its weight) and ``label``, when not empty, in the corner."""
    low, high = limits if limits is not None else (float(cam.min()), float(cam.max()))
    scaled = ((cam - low) / (high - low)).clamp(0, 1) if high > low else torch.zeros_like(cam)
    heat = Image.fromarray(_colormap(scaled.float().cpu()).numpy(), "RGB")
    blended = Image.blend(to_rgb(image), heat.resize(image.size), alpha)
    if label:
        draw = ImageDraw.Draw(blended)
        box = draw.textbbox((0, 0), label)
        draw.rectangle((0, 0, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
        draw.text((2, 2), label, fill=(255, 255, 255))
    return blended


def slices_overlay(
    volume: Tensor, cam: Tensor, label: str, alpha: float = 0.5, height: int = 192
) -> Image.Image:
    """The three central slices of ``volume`` (C, D, H, W; its first channel, in grey), across
    D, H and W in turn, side by side, each ``height`` pixels high with ``cam`` (D, H, W, the
    volume's grid) drawn over it as ``heat_overlay`` draws it (one colour scale for all three)
    and ``label`` on the first."""
    limits = (float(cam.min()), float(cam.max()))
    grey = volume[0].float().cpu()
    grey = ((grey - grey.min()) / (grey.max() - grey.min()).clamp_min(1e-12) * 255).round()
    panels = []
    for axis in range(3):
        middle = grey.shape[axis] // 2
        picture = Image.fromarray(grey.select(axis, middle).to(torch.uint8).numpy(), "L")
        picture = picture.resize(
            (max(1, round(height * picture.width / picture.height)), height), Image.BILINEAR
        )
        panel = heat_overlay(picture, cam.select(axis, middle), label, alpha, limits)
        panels.append(panel)
        label = ""
    sheet = Image.new("RGB", (sum(p.width for p in panels), height))
    left = 0
    for panel in panels:
        sheet.paste(panel, (left, 0))
        left += panel.width
    return sheet
