"""Named architectures: one table of configurations (DenseNets and RDNets), the builders
generated from it, ``list_models()`` and ``get_model()``."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

from .model import DenseNet, DenseNetFeatures
from .rdnet import RDNET_ARCHITECTURES, RDNet, RDNetFeatures

__all__ = ["ARCHITECTURES", "get_model", "list_models", "model_config"]


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
    **RDNET_ARCHITECTURES,
}


def list_models(pattern: str = "*") -> list[str]:
    """The architecture names that ``get_model`` accepts, those matching ``pattern`` (a shell
    pattern: ``"rdnet*"``, ``"densenet*"``)."""
    return fnmatch.filter(ARCHITECTURES, pattern)


def network_of(name: str) -> tuple[type[DenseNet] | type[RDNet], type[nn.Module]]:
    """The network class of architecture ``name`` and the class of its backbone form."""
    return (RDNet, RDNetFeatures) if name in RDNET_ARCHITECTURES else (DenseNet, DenseNetFeatures)


def model_config(name: str) -> dict[str, Any]:
    """The ``DenseNet(...)`` arguments of a named architecture (a copy)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return dict(ARCHITECTURES[name])


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
    from .weights import WeightsError, load_checkpoint, load_state, load_weights, resolve_weights

    config = model_config(name)
    network, backbone = network_of(name)
    if pretrained and weights is None:
        weights = "DEFAULT"
    entry = resolve_weights(name, weights)
    if entry is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = len(entry.categories)
    state = load_checkpoint(weights) if entry is None and weights is not None else None
    if state is not None:  # a file keeps its own head unless a new one is asked for
        classifier = state.get(network.CLASSIFIER + "weight")
        own = classifier.shape[0] if classifier is not None else 0
        asked = kwargs.setdefault("num_classes", own)
        if asked != own and not new_head:
            raise WeightsError(
                f"{weights} holds a {own}-class classifier, not num_classes={asked}: drop "
                f"num_classes to keep it, or pass new_head=True to fine-tune its backbone under "
                f"a new {asked}-class classifier"
            )
    model = network(**{**config, **kwargs}, arch=name)
    if state is not None:
        load_state(model, state, weights, inflate)
    elif entry is not None:
        load_weights(model, entry, progress, inflate)
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

    config = ARCHITECTURES[name]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"{name} (RDNet, Kim et al., ECCV 2024): growth rates {config['growth_rates']}, "
        f"{config['num_init_features']} stem features. Arguments as ``densenet.get_model``; "
        "``drop_path_rate``: stochastic depth of the last block."
    )
    return builder


globals().update(
    {
        n: (_make_rdnet_builder if n in RDNET_ARCHITECTURES else _make_builder)(n)
        for n in ARCHITECTURES
    }
)
__all__ += list(ARCHITECTURES)


def model_info(name: str) -> dict[str, Any]:
    """Parameters and forward GFLOPs (2 x multiply-accumulates, one image at the architecture's
    native size: 224 for ImageNet and RDNet, 32 for CIFAR) of a named architecture, counted on the meta
    device (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = model_config(name)
    size = 32 if config.get("stem") == "cifar" else 224
    with torch.device("meta"):
        model = network_of(name)[0](**config).eval()
        x = torch.empty(1, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
        "input_size": size,
        "num_classes": model.num_classes,
    }
