"""Named architectures: ``get_model()`` and the builders generated from the tables of
configurations (DenseNets and RDNets: ``densenet.architectures``, which also gives
``list_models()``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .architectures import ARCHITECTURES, list_models, model_config, model_info
from .model import DenseNet, DenseNetFeatures
from .rdnet import RDNET_ARCHITECTURES, RDNet, RDNetFeatures

__all__ = ["ARCHITECTURES", "get_model", "list_models", "model_config", "model_info"]


def network_of(name: str) -> tuple[type[DenseNet] | type[RDNet], type[nn.Module]]:
    """The network class of architecture ``name`` and the class of its backbone form."""
    return (RDNet, RDNetFeatures) if name in RDNET_ARCHITECTURES else (DenseNet, DenseNetFeatures)


def get_model(
    name: str,
    *,
    weights: Any = None,
    progress: bool = True,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    inflate: str = "mean",
    new_head: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the named architecture, optionally with weights: a ``DenseNet`` or an ``RDNet``
    (``densenet.rdnet``), or with ``features_only`` its backbone form.

    Args:
        name: one of ``list_models()``.
        weights: ``None`` (random init), ``"DEFAULT"``, a weights name such as ``"IMAGENET1K_V1"``,
            a ``densenet.Weights`` entry, or the path of a local checkpoint (.pth/.pt/.safetensors).
        progress: show a progress bar while downloading.
        pretrained: legacy spelling of ``weights="DEFAULT"``.
        features_only: return the backbone (``densenet.DenseNetFeatures``, for an RDNet
            ``densenet.rdnet.RDNetFeatures``): the feature maps after the dense blocks (RDNet:
            the stages of ``feature_info``) ``out_indices`` (default all), with its
            ``feature_info``.
        inflate: how 2D weights enter a ``spatial_dims=3`` model: ``"mean"`` (I3D: each kernel
            repeated along depth and divided by its depth) or ``"centre"`` (the kernel in the
            middle depth slice; a volume of identical slices then gives the 2D logits exactly).
            A 1D model takes each kernel's centre row. See ``densenet.weights.inflate_kernels``.
        new_head: with a weights file whose classifier has another number of classes than
            ``num_classes``: load its backbone under a new classifier (fine-tuning); without
            it that conflict is an error. A file with no ``num_classes`` keeps its own head;
            published weights with another ``num_classes`` always load as a backbone.
        kwargs: ``DenseNet`` (or ``RDNet``) arguments overriding the architecture's
            (``num_classes``, ``drop_rate``, ``memory_efficient``, ``in_channels``,
            ``spatial_dims``, ``stem_stride``; RDNet: ``drop_path_rate``, ...).
    """
    from .weights import WeightsFile, head_classes, load_state, parse_weights, read_state

    config = model_config(name)
    network, backbone = network_of(name)
    spec = parse_weights("DEFAULT" if pretrained and weights is None else weights, name)
    # a file is read first (its head decides the model's); published weights once it is built
    read = read_state(spec) if isinstance(spec, WeightsFile) else None
    state = read[0] if read is not None else None
    classes = head_classes(spec, state, network, kwargs.pop("num_classes", None), new_head)
    if classes is not None:
        kwargs["num_classes"] = classes
    model = network(**{**config, **kwargs}, arch=name)
    if spec is not None:
        load_state(model, *(read or read_state(spec, progress)), inflate)
    return backbone(model, out_indices) if features_only else model


def _make_builder(name: str):
    def builder(
        *, weights: Any = None, progress: bool = True, pretrained: bool = False, **kwargs: Any
    ) -> DenseNet | DenseNetFeatures:
        return get_model(name, weights=weights, progress=progress, pretrained=pretrained, **kwargs)

    config = ARCHITECTURES[name]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"{name}: growth rate {config['growth_rate']}, blocks {config['block_config']}, "
        f"{config['stem']} stem. Arguments as ``densenet.get_model``."
    )
    return builder


def _make_rdnet_builder(name: str):
    def builder(
        *,
        weights: Any = None,
        progress: bool = True,
        pretrained: bool = False,
        num_classes: int | None = None,
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        new_head: bool = False,
        **kwargs: Any,
    ) -> RDNet | RDNetFeatures:
        if num_classes is not None:  # None: the weights' classes (1000 without weights)
            kwargs["num_classes"] = num_classes
        return get_model(
            name,
            weights=weights,
            progress=progress,
            pretrained=pretrained,
            features_only=features_only,
            out_indices=out_indices,
            new_head=new_head,
            in_channels=in_channels,
            drop_path_rate=drop_path_rate,
            drop_rate=drop_rate,
            **kwargs,
        )

    config = RDNET_ARCHITECTURES[name]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"{name} (RDNet, Kim et al., ECCV 2024): growth rates {config['growth_rates']}, "
        f"{config['num_init_features']} stem features. Arguments as ``densenet.get_model``; "
        "``drop_path_rate``: stochastic depth of the last block."
    )
    return builder


globals().update({name: _make_builder(name) for name in ARCHITECTURES})
globals().update({name: _make_rdnet_builder(name) for name in RDNET_ARCHITECTURES})
__all__ += [*ARCHITECTURES, *RDNET_ARCHITECTURES]
