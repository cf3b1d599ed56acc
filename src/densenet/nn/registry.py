"""Named architectures: ``get_model()`` and one builder per architecture of the tables of
configurations (DenseNets and RDNets: ``densenet.architectures``, which also gives
``list_models()``), each a typed keyword-only function registered by ``register_model``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from densenet.architectures import ARCHITECTURES, list_models, model_config, model_info
from densenet.nn.model import DenseNet, DenseNetFeatures
from densenet.nn.rdnet import RDNET_ARCHITECTURES, RDNet, RDNetFeatures
from densenet.weights.published import WeightsArg

__all__ = [
    "ARCHITECTURES",
    "BUILDERS",
    "get_model",
    "list_models",
    "model_config",
    "model_info",
    "register_model",
]

F = TypeVar("F", bound=Callable[..., nn.Module])
DenseNetModel = DenseNet | DenseNetFeatures  # the latter with ``features_only=True``
RDNetModel = RDNet | RDNetFeatures


def network_of(name: str) -> tuple[type[DenseNet] | type[RDNet], type[nn.Module]]:
    """The network class of architecture ``name`` and the class of its backbone form."""
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
    from densenet.weights.adapt import build_with_weights
    from densenet.weights.published import parse_weights

    network, backbone = network_of(name)
    spec = parse_weights("DEFAULT" if pretrained and weights is None else weights, name)
    num_classes = kwargs.pop("num_classes", None)
    config = {**model_config(name), **kwargs, "arch": name}
    model = build_with_weights(
        network, config, spec, num_classes, new_head=new_head, inflate=inflate, progress=progress
    )
    return backbone(model, out_indices) if features_only else model


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
