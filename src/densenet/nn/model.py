"""The DenseNet module and its parts (Huang et al., CVPR 2017).

Module names follow torchvision's DenseNet, so the ImageNet models' state_dict is key-for-key and
shape-for-shape torchvision's: ``features.conv0/norm0/relu0/pool0``,
``features.denseblockN.denselayerM.norm1/relu1/conv1/norm2/relu2/conv2``,
``features.transitionN.norm/relu/conv/pool``, ``features.norm5``, ``classifier``.

This is the reference form, used for training and as the source of the faster forms built on it
(``densenet.optimize`` for inference, the memory-efficient block for training).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.architectures import min_input_size
from densenet.nn.bn_relu import memory_efficient_bn_relu
from densenet.nn.memory import memory_efficient_block
from densenet.nn.network import Network, new_classifier, take_indices

STEMS = ("imagenet", "cifar")
SPATIAL_DIMS = (1, 2, 3)


def nd(name: str, spatial_dims: int) -> type[nn.Module]:
    """The ``spatial_dims``-D form of a layer: ``nd("Conv", 3)`` is ``nn.Conv3d``; name one of
    Conv, BatchNorm, MaxPool, AvgPool."""
    return getattr(nn, f"{name}{spatial_dims}d")


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (to ``bn_size * growth_rate``) then BN-ReLU-Conv3x3 (to ``growth_rate``).

    Without a bottleneck (``bn_size=0``) the layer is a single BN-ReLU-Conv3x3, stored as
    ``norm1/relu1/conv1``. Dropout (the paper's, after each convolution) is applied only in training.

    Input (N, C_in, *spatial); output (N, growth_rate, *spatial): the layer's new features
    (``spatial_dims`` spatial axes: (H, W) in 2D, (D, H, W) in 3D, (L,) in 1D).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        conv, norm = nd("Conv", spatial_dims), nd("BatchNorm", spatial_dims)
        width = bn_size * growth_rate if bn_size else growth_rate
        self.norm1 = norm(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        if bn_size:
            self.conv1 = conv(in_channels, width, kernel_size=1, bias=False)
            self.norm2 = norm(width)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = conv(width, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = conv(in_channels, width, kernel_size=3, padding=1, bias=False)
            self.norm2 = self.relu2 = self.conv2 = None
        self.drop_rate = float(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        dropout = self.training and self.drop_rate > 0  # none traced for inference (FX, int8)
        out = self.conv1(self.relu1(self.norm1(x)))
        if dropout:
            out = F.dropout(out, self.drop_rate, True)
        if self.conv2 is not None and self.norm2 is not None and self.relu2 is not None:
            out = self.conv2(self.relu2(self.norm2(out)))
            if dropout:
                out = F.dropout(out, self.drop_rate, True)
        return out


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each fed the concatenation of the block input and all earlier
    layers' outputs. Input (N, C, H, W); output (N, C + num_layers * growth_rate, H, W).
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool | str = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(
                in_channels + i * growth_rate, growth_rate, bn_size, drop_rate, spatial_dims
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.set_memory_efficient(memory_efficient)

    def set_memory_efficient(self, mode: bool | str) -> None:
        """False, True (``densenet.nn.memory``), or ``"triton"`` (its fused kernels on CUDA)."""
        if mode not in (False, True, "triton"):
            raise ValueError(f'memory_efficient must be False, True or "triton", got {mode!r}')
        self.memory_efficient = bool(mode)
        self.triton = mode == "triton"

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._forward_memory_efficient(x)
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)

    @torch.jit.unused
    def _forward_memory_efficient(self, x: Tensor) -> Tensor:
        return memory_efficient_block(list(self.values()), x, self.triton)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 (to ``out_channels``) then 2x2 average pooling, stride 2; dropout after the
    convolution in training. Input (N, C_in, H, W); output (N, out_channels, H // 2, W // 2)
    (likewise every spatial axis in 1D and 3D).
    """

    def __init__(
        self, in_channels: int, out_channels: int, drop_rate: float, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.norm = nd("BatchNorm", spatial_dims)(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nd("Conv", spatial_dims)(in_channels, out_channels, kernel_size=1, bias=False)
        if drop_rate > 0:
            self.drop = nn.Dropout(drop_rate)
        self.pool = nd("AvgPool", spatial_dims)(kernel_size=2, stride=2)
        self.memory_efficient = False  # BN-ReLU output not kept for backward (densenet.nn.memory)

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._forward_memory_efficient(x)
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _forward_memory_efficient(self, x: Tensor) -> Tensor:
        x = memory_efficient_bn_relu(self.norm, x, conv=self.conv)
        if hasattr(self, "drop"):
            x = self.drop(x)
        return self.pool(x)


class DenseNet(Network):
    """A Dense Convolutional Network.

    Args:
        growth_rate: k, the channels each dense layer adds.
        block_config: the number of dense layers in each dense block.
        num_init_features: channels out of the stem convolution.
        bn_size: bottleneck width as a multiple of k (the paper's 4); 0 for no bottleneck.
        compression: a transition keeps ``floor(compression * C)`` of its C input channels.
        drop_rate: dropout probability after each convolution but the stem's, in training.
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns pooled features).
        in_channels: image channels.
        stem: ``"imagenet"`` (7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2; input /4) or
            ``"cifar"`` (3x3 conv stride 1).
        memory_efficient: train with activation memory linear in depth (see ``densenet.nn.memory``);
            ``"triton"``: the same with each bottleneck's BN-ReLU-Conv1x1 as fused Triton kernels
            on channels_last CUDA inputs (2D only).
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W), 1 for signals
            (N, C, L); every convolution, norm and pooling takes that many spatial axes (the 2D
            model is torchvision's, key for key).
        stem_stride: per spatial axis, the ImageNet stem's downsampling: 1 keeps that axis (its
            convolution and max-pool run with stride 1 along it), 2 (default) halves it in each.
            ``(1, 2, 2)`` suits thin volumes (few slices). None: 2 along every axis.
        arch: the registry name of this configuration (``densenet.get_model`` gives it), or
            None for a custom one.

    Input (N, in_channels, *spatial) float; output (N, num_classes) logits.
    """

    __jit_unused_properties__ = ["min_input_size", "feature_info"]  # noqa: RUF012 (TorchScript's hook)

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        memory_efficient: bool | str = False,
        spatial_dims: int = 2,
        stem_stride: Sequence[int] | None = None,
        arch: str | None = None,
    ) -> None:
        super().__init__()
        config = {
            "growth_rate": growth_rate,
            "block_config": block_config,
            "num_init_features": num_init_features,
            "bn_size": bn_size,
            "compression": compression,
            "drop_rate": drop_rate,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "stem": stem,
        }
        _check_config(**config)
        stem_stride = _check_spatial(spatial_dims, stem_stride)
        self.config: dict[str, Any] = {**config, "block_config": tuple(block_config)}
        if spatial_dims != 2:  # the 2D config stays as it was (saved cards and checkpoints)
            self.config["spatial_dims"] = spatial_dims
        if stem_stride != (2,) * spatial_dims:
            self.config["stem_stride"] = stem_stride
        self.spatial_dims = spatial_dims
        self.features, channels = _features(
            self.config, memory_efficient, spatial_dims, stem_stride
        )
        self.num_features = channels
        self.num_classes = num_classes
        self.classifier: nn.Module = new_classifier(channels, num_classes)
        self.arch = arch
        self._init_weights()
        self.set_memory_efficient(memory_efficient)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def set_memory_efficient(self, enabled: bool | str = True) -> None:
        """Switch every dense block to (or from) the memory-efficient training form (``"triton"``:
        with the fused kernels), and the stem's and transitions' BN-ReLUs with them."""
        for module in self.modules():
            if isinstance(module, DenseBlock):
                module.set_memory_efficient(enabled)
            elif isinstance(module, Transition):
                module.memory_efficient = bool(enabled)
        self.memory_efficient = bool(enabled)

    @property
    def min_input_size(self) -> int:
        """The smallest input height and width, pixels (``densenet.architectures.min_input_size``
        of the configuration)."""
        return min_input_size(self.config)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_features, h, w) after the final BN-ReLU."""
        if self.memory_efficient and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return F.relu(self._features_memory_efficient(x))
        return F.relu(self.features(x))

    @torch.jit.unused
    def _features_memory_efficient(self, x: Tensor) -> Tensor:
        """``features(x)`` with the ImageNet stem's BN-ReLU output not kept for backward."""
        f = self.features
        if not hasattr(f, "norm0"):  # the CIFAR stem: a convolution only
            return f(x)
        stem = ("conv0", "norm0", "relu0", "pool0")
        x = memory_efficient_bn_relu(f.norm0, f.conv0(x), pool=f.pool0)
        for name, module in f.named_children():
            if name not in stem:
                x = module(x)
        return x

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Per dense block, what ``forward_intermediates`` returns for it: ``num_chs`` channels,
        ``reduction`` (input pixels per feature-map pixel: 4, 8, 16, 32 for the ImageNet stem;
        1, 2, 4 for the CIFAR stem) and ``module``, the module whose output it is."""
        reduction = 1 if self.config["stem"] == "cifar" else 4
        info = []
        children = list(self.features.named_children())
        for (name, module), (after_name, after) in zip(children, children[1:]):
            if isinstance(module, Transition):
                reduction *= 2
            elif isinstance(module, DenseBlock):  # a transition or norm5 follows: its BN's width
                norm = after.norm if isinstance(after, Transition) else after
                last = after_name == "norm5"  # the last block's map is after the final BN-ReLU
                source = f"features.{after_name if last else name}"
                info.append(
                    {"num_chs": norm.num_features, "reduction": reduction, "module": source}
                )
        return info

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """(N, in_channels, H, W) -> the feature map after each dense block, (N, num_chs, H /
        reduction, W / reduction) as ``feature_info`` says: each block's output (its input and
        every layer's new features), the last one after the final BN-ReLU (``forward_features``)."""
        return _block_outputs(self.features, x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, *spatial) -> global average pool -> (N, num_features), then logits
        (N, num_classes) unless ``pre_logits``."""
        if self.spatial_dims == 2:
            x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1) if self.spatial_dims == 2 else torch.flatten(x, 2).mean(2)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` outputs."""
        self.classifier = new_classifier(self.num_features, num_classes)
        self.num_classes = num_classes
        self.config = {**self.config, "num_classes": num_classes}  # forms made before keep theirs


def _block_outputs(features: nn.Sequential, x: Tensor) -> list[Tensor]:
    maps = []
    for module in features:
        x = module(x)
        if isinstance(module, DenseBlock):
            maps.append(x)
    maps[-1] = F.relu(x)  # after norm5
    return maps


class DenseNetFeatures(nn.Module):
    """A DenseNet as a backbone for detection or segmentation: the feature maps after the dense
    blocks ``out_indices`` (default all; negative counts from the end), as
    ``DenseNet.forward_intermediates`` computes them, without the classifier.

    ``features`` is the DenseNet's own (the same parameters, state_dict keys ``features.*``);
    ``feature_info`` lists the maps returned: channels, reduction and source module.
    Input (N, in_channels, H, W); output a list of (N, num_chs, H / reduction, W / reduction).
    """

    def __init__(self, model: DenseNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        info = model.feature_info
        self.out_indices = take_indices(len(info), out_indices, "dense-block")
        self.features = model.features
        self.feature_info = [info[i] for i in self.out_indices]
        self.config = {**model.config, "num_classes": 0}

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = _block_outputs(self.features, x)
        return [maps[i] for i in self.out_indices]


def _features(
    config: dict[str, Any],
    memory_efficient: bool | str,
    spatial_dims: int,
    stem_stride: tuple[int, ...],
) -> tuple[nn.Sequential, int]:
    """The ``features`` of a DenseNet ``config`` (stem, dense blocks, transitions, ``norm5``) and
    the channels they output."""
    channels = config["num_init_features"]
    stem = _stem(config["stem"], config["in_channels"], channels, spatial_dims, stem_stride)
    features = nn.Sequential(stem)
    growth_rate, drop_rate = config["growth_rate"], config["drop_rate"]
    blocks = config["block_config"]
    layer_args = (growth_rate, config["bn_size"], drop_rate, memory_efficient, spatial_dims)
    for i, num_layers in enumerate(blocks):
        block = DenseBlock(num_layers, channels, *layer_args)
        features.add_module(f"denseblock{i + 1}", block)
        channels += num_layers * growth_rate
        if i != len(blocks) - 1:
            out_channels = math.floor(channels * config["compression"])
            transition = Transition(channels, out_channels, drop_rate, spatial_dims)
            features.add_module(f"transition{i + 1}", transition)
            channels = out_channels
    features.add_module("norm5", nd("BatchNorm", spatial_dims)(channels))
    return features, channels


def _stem(
    stem: str, in_channels: int, num_init_features: int, dims: int, stride: tuple[int, ...]
) -> OrderedDict[str, nn.Module]:
    """The CIFAR stem (3^d conv) or the ImageNet stem (7^d conv, BN, ReLU, 3^d max-pool), each of
    the latter two downsampling by ``stride`` per axis."""
    conv = nd("Conv", dims)
    if stem == "cifar":
        return OrderedDict(conv0=conv(in_channels, num_init_features, 3, padding=1, bias=False))
    if stride == (2,) * dims:  # the plain ints keep the 2D modules' repr torchvision's
        stride = 2
    return OrderedDict(
        conv0=conv(in_channels, num_init_features, 7, stride=stride, padding=3, bias=False),
        norm0=nd("BatchNorm", dims)(num_init_features),
        relu0=nn.ReLU(inplace=True),
        pool0=nd("MaxPool", dims)(kernel_size=3, stride=stride, padding=1),
    )


def _check_spatial(spatial_dims: int, stem_stride: Sequence[int] | None) -> tuple[int, ...]:
    """The stem stride per axis, after checking ``spatial_dims`` and ``stem_stride``."""
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    if stem_stride is None:
        return (2,) * spatial_dims
    stride = tuple(stem_stride)
    if len(stride) != spatial_dims or any(s not in (1, 2) for s in stride):
        raise ValueError(
            f"stem_stride must be {spatial_dims} values of 1 or 2 (one per spatial axis), "
            f"got {stem_stride!r}"
        )
    return stride


def _check_config(
    growth_rate: int,
    block_config: Sequence[int],
    num_init_features: int,
    bn_size: int,
    compression: float,
    drop_rate: float,
    num_classes: int,
    in_channels: int,
    stem: str,
) -> None:
    positive = {"growth_rate": growth_rate, "num_init_features": num_init_features}
    positive["in_channels"] = in_channels
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not block_config or any(not isinstance(n, int) or n < 1 for n in block_config):
        raise ValueError(f"block_config must be positive layer counts, got {block_config!r}")
    if not isinstance(bn_size, int) or bn_size < 0:
        raise ValueError(f"bn_size must be an integer >= 0 (0: no bottleneck), got {bn_size!r}")
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
