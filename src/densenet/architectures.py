"""Named architectures without torch: the tables of configurations (DenseNets, RDNets),
``list_models()``,
``model_config()``, and what a configuration implies (the smallest input, parameters, GFLOPs),
computed arithmetically, so that ``densenet info`` answers before torch loads.

A model family plugs in with ``register_family``: its table of configurations and a function
that summarises one of them without building it (``densenet_summary`` for the DenseNets).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "RDNET_ARCHITECTURES",
    "Family",
    "densenet_summary",
    "list_models",
    "min_input_size",
    "model_config",
    "model_info",
    "model_min_size",
    "register_family",
]


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


def densenet_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters and forward GFLOPs (2 x the multiply-accumulates of the convolutions and the
    classifier, as ``torch.utils.flop_counter`` counts them) of a 2D DenseNet configuration on one
    image at its native size (224 for the ImageNet stem, 32 for the CIFAR stem)."""
    growth = config["growth_rate"]
    width = config["bn_size"] * growth  # the bottleneck's channels (none for bn_size 0)
    size = 224 if config["stem"] == "imagenet" else 32
    convs: list[tuple[int, int, int, int]] = []  # (in, out, kernel, output side)
    norms: list[int] = []  # channels of each batch norm (a weight and a bias each)
    channels, side = config["num_init_features"], size
    if config["stem"] == "imagenet":
        side = (side - 1) // 2 + 1  # 7x7 convolution, stride 2, padding 3
        convs.append((config.get("in_channels", 3), channels, 7, side))
        norms.append(channels)
        side = (side - 1) // 2 + 1  # 3x3 max-pool, stride 2, padding 1
    else:
        convs.append((config.get("in_channels", 3), channels, 3, side))
    for i, layers in enumerate(config["block_config"]):
        for _ in range(layers):
            norms.append(channels)
            if width:
                convs += [(channels, width, 1, side), (width, growth, 3, side)]
                norms.append(width)
            else:
                convs.append((channels, growth, 3, side))
            channels += growth
        if i < len(config["block_config"]) - 1:
            out = math.floor(channels * config["compression"])
            norms.append(channels)
            convs.append((channels, out, 1, side))
            channels, side = out, side // 2
    norms.append(channels)  # norm5
    classes = config["num_classes"]
    weights = sum(c_in * c_out * k * k for c_in, c_out, k, _ in convs)
    macs = sum(c_in * c_out * k * k * s * s for c_in, c_out, k, s in convs) + channels * classes
    return {
        "params": weights + 2 * sum(norms) + (channels + 1) * classes,
        "gflops": 2 * macs / 1e9,
        "input_size": size,
        "num_classes": classes,
    }


@dataclass(frozen=True)
class Family:
    """A model family: its named configurations, ``summary``, a function of one configuration
    that returns its ``params``, ``gflops``, ``input_size`` and ``num_classes`` without building
    the model (what ``densenet info`` lists), and ``min_input_size``, its smallest input side."""

    name: str
    configs: Mapping[str, Mapping[str, Any]]
    summary: Callable[[Mapping[str, Any]], dict[str, Any]]
    min_input_size: Callable[[Mapping[str, Any]], int]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family``'s architectures to ``list_models()``; a name taken by another family is
    an error."""
    taken = sorted(set(family.configs) & set(list_models()))
    if taken:
        raise ValueError(f"architecture names {taken} are taken; rename them in {family.name}")
    FAMILIES[family.name] = family
    return family


def list_models(pattern: str = "*") -> list[str]:
    """The architecture names that ``get_model`` accepts, those matching ``pattern`` (a shell
    pattern: ``"rdnet*"``, ``"densenet*"``)."""
    names = [name for family in FAMILIES.values() for name in family.configs]
    return fnmatch.filter(names, pattern)


def _family(name: str) -> Family:
    family = next((f for f in FAMILIES.values() if name in f.configs), None)
    if family is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return family


def model_config(name: str) -> dict[str, Any]:
    """The constructor arguments of a named architecture (a copy)."""
    return dict(_family(name).configs[name])


def model_min_size(name: str) -> int:
    """A named architecture's smallest input height and width, pixels."""
    return _family(name).min_input_size(model_config(name))


def model_info(name: str) -> dict[str, Any]:
    """A named architecture's ``name``, ``params``, ``gflops`` (one image at ``input_size``) and
    ``num_classes``, from its family's summary of its configuration (nothing is built)."""
    return {"name": name, **_family(name).summary(model_config(name))}


register_family(Family("densenet", ARCHITECTURES, densenet_summary, min_input_size))


def _rdnet(
    num_init_features: int, growth_rates: Sequence[int], downsample: Sequence[int]
) -> dict[str, Any]:
    """A published RDNet: 3 blocks per stage, the plain block in the first two stages and the SE
    block after, downsampling at the stages in ``downsample``."""
    stages = len(growth_rates)
    return {
        "num_init_features": num_init_features,
        "growth_rates": tuple(growth_rates),
        "num_blocks": (3,) * stages,
        "downsample": tuple(i in downsample for i in range(stages)),
        "se": tuple(i >= 2 for i in range(stages)),
    }


RDNET_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "rdnet_tiny": _rdnet(64, (64, 104, 128, 128, 128, 128, 224), (1, 2, 6)),
    "rdnet_small": _rdnet(72, (64, 128, *(128,) * 7, 240, 240), (1, 2, 9)),
    "rdnet_base": _rdnet(120, (96, 128, *(168,) * 7, 336, 336), (1, 2, 9)),
    "rdnet_large": _rdnet(144, (128, 192, *(256,) * 8, 360, 360), (1, 2, 10)),
}
# (parameters, forward GFLOPs at 224x224, 1000 classes) of each RDNet, counted by building it on
# the meta device under torch's FlopCounterMode (tests/test_rdnet.py counts them again)
RDNET_COUNTS = {
    "rdnet_tiny": (23_863_008, 10.065346848),
    "rdnet_small": (50_436_448, 17.41243368),
    "rdnet_base": (87_451_096, 30.716318592),
    "rdnet_large": (186_269_632, 69.350587584),
}


def rdnet_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """A published RDNet configuration's parameters and GFLOPs (``RDNET_COUNTS``)."""
    name = next(n for n, c in RDNET_ARCHITECTURES.items() if c == config)
    params, gflops = RDNET_COUNTS[name]
    return {"params": params, "gflops": gflops, "input_size": 224, "num_classes": 1000}


def rdnet_min_input_size(config: Mapping[str, Any]) -> int:
    """The smallest input side of an RDNet, pixels: a patch (``patch_size``, default 4) per stem
    output pixel, halved by each downsampling transition (the first stage has none)."""
    return config.get("patch_size", 4) * 2 ** sum(config["downsample"][1:])


register_family(Family("rdnet", RDNET_ARCHITECTURES, rdnet_summary, rdnet_min_input_size))
