"""Named architectures: ``get_model()`` and one builder per architecture of the tables of
configurations (DenseNets and RDNets: ``densenet.architectures``, which also gives
``list_models()``), each a typed keyword-only function registered by ``register_model``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from densenet.architectures import ARCHITECTURES, list_models, model_config, model_info
from densenet.nn.model import DenseNet, DenseNetFeatures
from densenet.nn.rdnet import RDNET_ARCHITECTURES, RDNet, RDNetFeatures
from densenet.weights.adapt import build_with_weights
from densenet.weights.published import WeightsArg, WeightsError, WeightsSpec, parse_weights

__all__ = [
    "ARCHITECTURES",
    "BUILDERS",
    "arch_of_config",
    "arch_of_file",
    "arch_of_state",
    "build_model",
    "config_of_state",
    "get_model",
    "list_models",
    "model_config",
    "model_info",
    "rdnet_of_state",
    "register_model",
]

F = TypeVar("F", bound=Callable[..., nn.Module])
DenseNetModel = DenseNet | DenseNetFeatures  # the latter with ``features_only=True``
RDNetModel = RDNet | RDNetFeatures


def network_of(name: str | None) -> tuple[type[DenseNet] | type[RDNet], type[nn.Module]]:
    """The network class of architecture ``name`` (None: a custom DenseNet) and the class of its
    backbone form."""
    return (RDNet, RDNetFeatures) if name in RDNET_ARCHITECTURES else (DenseNet, DenseNetFeatures)


def get_model(
    name: str,
    *,
    weights: WeightsArg = None,
    progress: bool = True,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    inflate: str = "mean",
    new_head: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the named architecture, optionally with weights: a ``DenseNet`` or an ``RDNet``
    (``densenet.nn.rdnet``), or with ``features_only`` its backbone form.

    Args:
        name: one of ``list_models()``.
        weights: ``None`` (random init), ``"DEFAULT"``, a weights name such as ``"IMAGENET1K_V1"``,
            a ``densenet.Weights`` entry, or the path of a local checkpoint (.pth/.pt/.safetensors);
            read once by ``densenet.weights.published.parse_weights`` (a value it returned passes as is).
        progress: show a progress bar while downloading.
        pretrained: legacy spelling of ``weights="DEFAULT"``.
        features_only: return the backbone (``densenet.DenseNetFeatures``, for an RDNet
            ``densenet.nn.rdnet.RDNetFeatures``): the feature maps after the dense blocks (RDNet:
            the stages of ``feature_info``) ``out_indices`` (default all), with its
            ``feature_info``.
        inflate: how 2D weights enter a ``spatial_dims=3`` model: ``"mean"`` (I3D: each kernel
            repeated along depth and divided by its depth) or ``"centre"`` (the kernel in the
            middle depth slice; a volume of identical slices then gives the 2D logits exactly).
            A 1D model takes each kernel's centre row. See ``densenet.weights.adapt.inflate_kernels``.
        new_head: with a weights file whose classifier has another number of classes than
            ``num_classes``: load its backbone under a new classifier (fine-tuning); without
            it that conflict is an error. A file with no ``num_classes`` keeps its own head;
            published weights with another ``num_classes`` always load as a backbone.
        kwargs: ``DenseNet`` (or ``RDNet``) arguments overriding the architecture's
            (``num_classes``, ``drop_rate``, ``memory_efficient``, ``in_channels``,
            ``spatial_dims``, ``stem_stride``; RDNet: ``drop_path_rate``, ...).
    """
    spec = parse_weights("DEFAULT" if pretrained and weights is None else weights, name)
    model = build_model(name, spec, progress=progress, inflate=inflate, new_head=new_head, **kwargs)
    return network_of(name)[1](model, out_indices) if features_only else model


def build_model(
    name: str,
    spec: WeightsSpec,
    *,
    progress: bool = True,
    inflate: str = "mean",
    new_head: bool = False,
    **kwargs: Any,
) -> DenseNet | RDNet:
    """``get_model(name, weights=spec, ...)`` for weights already parsed (``parse_weights``;
    a ``WeightsFile`` that ``read_weights`` read passes its state as it is)."""
    num_classes = kwargs.pop("num_classes", None)
    config = {**model_config(name), **kwargs, "arch": name}
    network = network_of(name)[0]
    return build_with_weights(
        network, config, spec, num_classes, new_head=new_head, inflate=inflate, progress=progress
    )


def arch_of_file(path: str | os.PathLike, arch: str | None = None) -> str | None:
    """``arch`` if given, else the architecture a file's name starts with
    (``densenet121-a639ec97.pth``), else None."""
    if arch:
        return arch
    stem = Path(path).name.split("-")[0].split(".")[0]
    return stem if stem in list_models() else None


def arch_of_state(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """The architecture a weights file's state_dict (current key names: ``read_weights``)
    describes by its keys and shapes (a torchvision or timm DenseNet, or a timm or NAVER RDNet,
    of any class count), else ``WeightsError``."""
    arch, config = described_by(state, path)
    if arch is None:
        raise WeightsError(
            f"{path} is a DenseNet of no registered architecture ({config}); name it with "
            "--model, or load it with densenet.DenseNet(**config)"
        )
    return arch


def described_by(
    state: Mapping[str, Tensor], path: str | os.PathLike
) -> tuple[str | None, dict[str, Any] | None]:
    """The architecture ``state``'s keys and shapes describe (None: a DenseNet of no registered
    architecture) and, for a DenseNet, the configuration read from them (``config_of_state``;
    None for an RDNet, whose size is its configuration)."""
    if RDNet.STEM_WEIGHT in state:
        return rdnet_of_state(state, path), None
    config = config_of_state(state, path)
    return arch_of_config(config), config


def rdnet_of_state(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """The RDNet size whose tensors have the shapes of ``state``'s (any number of classes and
    input channels), else ``WeightsError``; the networks are built on the meta device."""
    own = (RDNet.STEM_WEIGHT, RDNet.CLASSIFIER + "weight", RDNet.CLASSIFIER + "bias")
    shapes = {k: v.shape for k, v in state.items() if k not in own}
    for name in list_models("rdnet*"):
        with torch.device("meta"):
            expected = get_model(name).state_dict()
        if {k: v.shape for k, v in expected.items() if k not in own} == shapes:
            return name
    raise WeightsError(
        f"{path} is an RDNet of no registered size; name it with --model, or build it with "
        "densenet.RDNet(...)"
    )


def config_of_state(state: Mapping[str, Tensor], path: str | os.PathLike) -> dict[str, Any]:
    """The ``DenseNet(...)`` arguments a state_dict (current key names) was saved from, read from
    its keys and shapes: stem, init features, growth rate, bottleneck, block configuration,
    compression, classes. Raises ``WeightsError`` when it is not a DenseNet's."""
    stem = state.get("features.conv0.weight")
    first = state.get("features.denseblock1.denselayer1.conv1.weight")
    if stem is None or first is None or stem.dim() != 4 or first.dim() != 4:
        raise WeightsError(
            f"cannot tell the architecture of {path} from its keys (no DenseNet stem and first "
            "dense layer); name it with --model"
        )
    layers: dict[int, int] = {}
    for key in state:
        found = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
        if found:
            block, layer = int(found.group(1)), int(found.group(2))
            layers[block] = max(layers.get(block, 0), layer)
    second = state.get("features.denseblock1.denselayer1.conv2.weight")
    growth_rate = (second if second is not None else first).shape[0]
    transition = state.get("features.transition1.conv.weight")
    classifier = state.get("classifier.weight")
    return {
        "growth_rate": growth_rate,
        "block_config": tuple(layers[b] for b in sorted(layers)),
        "num_init_features": stem.shape[0],
        "bn_size": first.shape[0] // growth_rate if second is not None else 0,
        "compression": transition.shape[0] / transition.shape[1] if transition is not None else 0.5,
        "num_classes": classifier.shape[0] if classifier is not None else 0,
        "in_channels": stem.shape[1],
        "stem": "imagenet" if stem.shape[-1] == 7 else "cifar",
    }


def arch_of_config(config: Mapping[str, Any]) -> str | None:
    """The architecture whose network ``config`` builds, up to the classifier and input
    channels, else None."""
    ignored = ("num_classes", "drop_rate", "in_channels")

    def network(c: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k not in ignored}

    return next((n for n in list_models() if network(model_config(n)) == network(config)), None)


BUILDERS: dict[str, Callable[..., nn.Module]] = {}
"""Each architecture's builder, by name (``register_model``)."""


def register_model(builder: F) -> F:
    """Register ``builder`` as the builder of the architecture it is named after (one of
    ``ARCHITECTURES`` or ``RDNET_ARCHITECTURES``); its docstring says the configuration."""
    name = builder.__name__
    if name in ARCHITECTURES:
        config = ARCHITECTURES[name]
        summary = (
            f"{name}: growth rate {config['growth_rate']}, blocks {config['block_config']}, "
            f"{config['stem']} stem."
        )
    elif name in RDNET_ARCHITECTURES:
        config = RDNET_ARCHITECTURES[name]
        summary = (
            f"{name} (RDNet, Kim et al., ECCV 2024): growth rates {config['growth_rates']}, "
            f"{config['num_init_features']} stem features; ``drop_path_rate``: stochastic depth "
            "of the last block."
        )
    else:
        raise ValueError(f"{name} is no architecture of the configuration tables")
    builder.__doc__ = f"{summary} Arguments as ``densenet.get_model``."
    BUILDERS[name] = builder
    return builder


@register_model
def densenet121(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet121", weights=weights, progress=progress, **kwargs)


@register_model
def densenet161(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet161", weights=weights, progress=progress, **kwargs)


@register_model
def densenet169(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet169", weights=weights, progress=progress, **kwargs)


@register_model
def densenet201(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet201", weights=weights, progress=progress, **kwargs)


@register_model
def densenet264(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet264", weights=weights, progress=progress, **kwargs)


@register_model
def densenet_40_k12(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet_40_k12", weights=weights, progress=progress, **kwargs)


@register_model
def densenet_100_k12(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet_100_k12", weights=weights, progress=progress, **kwargs)


@register_model
def densenet_100_k24(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet_100_k24", weights=weights, progress=progress, **kwargs)


@register_model
def densenet_bc_100_k12(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet_bc_100_k12", weights=weights, progress=progress, **kwargs)


@register_model
def densenet_bc_250_k24(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet_bc_250_k24", weights=weights, progress=progress, **kwargs)


@register_model
def densenet_bc_190_k40(
    *, weights: WeightsArg = None, progress: bool = True, **kwargs: Any
) -> DenseNetModel:
    return get_model("densenet_bc_190_k40", weights=weights, progress=progress, **kwargs)


@register_model
def rdnet_tiny(*, weights: WeightsArg = None, progress: bool = True, **kwargs: Any) -> RDNetModel:
    return get_model("rdnet_tiny", weights=weights, progress=progress, **kwargs)


@register_model
def rdnet_small(*, weights: WeightsArg = None, progress: bool = True, **kwargs: Any) -> RDNetModel:
    return get_model("rdnet_small", weights=weights, progress=progress, **kwargs)


@register_model
def rdnet_base(*, weights: WeightsArg = None, progress: bool = True, **kwargs: Any) -> RDNetModel:
    return get_model("rdnet_base", weights=weights, progress=progress, **kwargs)


@register_model
def rdnet_large(*, weights: WeightsArg = None, progress: bool = True, **kwargs: Any) -> RDNetModel:
    return get_model("rdnet_large", weights=weights, progress=progress, **kwargs)


__all__ += list(BUILDERS)
