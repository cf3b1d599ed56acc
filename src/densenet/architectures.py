"""Named architectures without torch: the table of configurations, ``list_models()``,
``model_config()``, and what a configuration implies (the smallest input), computed
arithmetically."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ARCHITECTURES", "list_models", "min_input_size", "model_config"]


def _imagenet(growth_rate: int, block_config: tuple[int, ...], num_init_features: int) -> dict:
    return {
        "growth_rate": growth_rate,
        "block_config": block_config,
        "num_init_features": num_init_features,
        "bn_size": 4,
        "compression": 0.5,
        "num_classes": 1000,
        "stem": "imagenet",
    }


def _cifar(depth: int, growth_rate: int, bc: bool) -> dict:
    """The paper's 3-block CIFAR/SVHN network of ``depth`` layers (section 3): (depth - 4) / 3
    layers per block, or (depth - 4) / 6 bottleneck layers for DenseNet-BC."""
    per_block = (depth - 4) // (6 if bc else 3)
    return {
        "growth_rate": growth_rate,
        "block_config": (per_block,) * 3,
        "num_init_features": 2 * growth_rate if bc else 16,
        "bn_size": 4 if bc else 0,
        "compression": 0.5 if bc else 1.0,
        "num_classes": 10,
        "stem": "cifar",
    }


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "densenet121": _imagenet(32, (6, 12, 24, 16), 64),
    "densenet161": _imagenet(48, (6, 12, 36, 24), 96),
    "densenet169": _imagenet(32, (6, 12, 32, 32), 64),
    "densenet201": _imagenet(32, (6, 12, 48, 32), 64),
    "densenet264": _imagenet(32, (6, 12, 64, 48), 64),
    "densenet_40_k12": _cifar(40, 12, bc=False),
    "densenet_100_k12": _cifar(100, 12, bc=False),
    "densenet_100_k24": _cifar(100, 24, bc=False),
    "densenet_bc_100_k12": _cifar(100, 12, bc=True),
    "densenet_bc_250_k24": _cifar(250, 24, bc=True),
    "densenet_bc_190_k40": _cifar(190, 40, bc=True),
}


def min_input_size(config: Mapping[str, Any]) -> int:
    """The smallest input height and width, pixels, of a DenseNet configuration: every
    transition halves the feature map (2x2 pooling, rounding down), the ImageNet stem divides it
    by 4 (rounding up) along each axis of stem stride 2 and keeps an axis of stride 1; the largest
    over the axes."""
    transitions = len(config["block_config"]) - 1
    if config["stem"] == "cifar" or 2 not in config.get("stem_stride", (2,)):
        return 2**transitions
    return 4 * (2**transitions - 1) + 1


def list_models() -> list[str]:
    """Every architecture name that ``get_model`` accepts."""
    return list(ARCHITECTURES)


def model_config(name: str) -> dict[str, Any]:
    """The ``DenseNet(...)`` arguments of a named architecture (a copy)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return dict(ARCHITECTURES[name])
