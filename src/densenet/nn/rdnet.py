"""RDNet (Kim et al., "DenseNets Reloaded: Paradigm Shift Beyond ResNets and ViTs", ECCV 2024):
dense connectivity with a modern block, in plain PyTorch.

A patchify stem (a ``patch_size`` convolution of the same stride, then LayerNorm over channels),
then stages of dense blocks: each block reads the concatenation of the stage input and every
earlier block's output and adds ``growth_rate`` channels through a 7x7 depthwise convolution,
LayerNorm, a 1x1 expansion (to ``bottleneck_width_ratio`` times its input, rounded down to a
multiple of 8) with GELU, a 1x1 projection to the growth rate, from the third stage on an
effective squeeze-excitation (one 1x1 convolution on the global mean, hard sigmoid gate), then
layer scale and stochastic depth. Between stages a transition (LayerNorm, then a convolution to
half the channels rounded down to a multiple of 8: 2x2 stride 2 where the stage downsamples,
else 1x1). The head: global average pool, LayerNorm, (dropout), Linear.

Module names and the math are timm's ``timm.models.rdnet``, so its state_dict (and through
``densenet.weights.convert.convert_rdnet_keys`` NAVER's original one) loads strictly: ``stem.0/1``,
``dense_stages.I`` (``.0`` norm and ``.1`` convolution of the transition for I > 0, then the
stage ``dense_blockJ`` with ``gamma`` and ``layers.layers.0..4`` (``.5.fc`` the SE)),
``head.norm``, ``head.fc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.architectures import RDNET_ARCHITECTURES, rdnet_min_input_size
from densenet.nn.network import Network, new_classifier, take_indices
from densenet.nn.rdnet_memory import memory_efficient_stage

__all__ = ["RDNET_ARCHITECTURES", "RDNet", "RDNetFeatures"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel: (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


class EffectiveSE(nn.Module):
    """Effective squeeze-excitation (Lee and Park, CenterMask, CVPR 2020): ``x * hardsigmoid(
    fc(mean over pixels of x))`` with ``fc`` a 1x1 convolution (with bias) keeping the width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return x * F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class BlockLayers(nn.Module):
    """The body of a dense block, held as ``layers`` (the key names): depthwise 7x7, LayerNorm,
    1x1 to ``width``, GELU, 1x1 to ``growth_rate``, optionally ``EffectiveSE``.
    (N, in_channels, H, W) -> (N, growth_rate, H, W)."""

    def __init__(self, in_channels: int, width: int, growth_rate: int, se: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels),
            LayerNorm2d(in_channels),
            nn.Conv2d(in_channels, width, 1),
            nn.GELU(),
            nn.Conv2d(width, growth_rate, 1),
        )
        if se:
            self.layers.append(EffectiveSE(growth_rate))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: in training, each sample's ``x`` zeroed with probability ``rate``, the
    others scaled by ``1 / (1 - rate)`` (so the expectation is ``x``); else ``x``."""
    if not training or rate == 0:
        return x
    keep = 1 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DenseBlock(nn.Module):
    """One RDNet dense block: the concatenation of its inputs -> ``BlockLayers`` -> layer scale
    (``gamma``, per channel) -> stochastic depth -> dropout. Takes the list of the stage's maps
    so far, returns the (N, growth_rate, H, W) new features."""

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck_width_ratio: float,
        se: bool,
        ls_init_value: float,
        drop_path_rate: float,
        proj_drop_rate: float,
    ) -> None:
        super().__init__()
        width = int(in_channels * bottleneck_width_ratio / 8) * 8
        self.gamma = nn.Parameter(torch.full((growth_rate,), float(ls_init_value)))
        self.layers = BlockLayers(in_channels, width, growth_rate, se)
        self.drop_path_rate = drop_path_rate
        self.proj_drop_rate = proj_drop_rate

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.layers(torch.cat(features, 1)) * self.gamma.view(1, -1, 1, 1)
        x = drop_path(x, self.drop_path_rate, self.training)
        return F.dropout(x, self.proj_drop_rate, self.training) if self.proj_drop_rate else x


class DenseStage(nn.Sequential):
    """Dense blocks ``dense_block0``...: (N, C, H, W) -> (N, C + blocks * growth_rate, H, W),
    the input and every block's new features concatenated; when ``memory_efficient`` and
    gradients are on, as one buffer with the cheap parts recomputed in backward
    (``densenet.nn.rdnet_memory``)."""

    memory_efficient = False

    def forward(self, x: Tensor) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self._forward_memory_efficient(x)
        features = [x]
        for block in self:
            features.append(block(features))
        return torch.cat(features, 1)

    @torch.jit.unused
    def _forward_memory_efficient(self, x: Tensor) -> Tensor:
        return memory_efficient_stage(list(self), x)


class Head(nn.Module):
    """Global average pool, LayerNorm, dropout, then ``fc`` (Identity for 0 classes):
    (N, C, h, w) -> (N, num_classes)."""

    def __init__(self, channels: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.drop_rate = drop_rate
        self.fc = new_classifier(channels, num_classes)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.norm(F.adaptive_avg_pool2d(x, 1)), 1)
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.fc(x)


class RDNet(Network):
    """A Revitalized DenseNet.

    Args:
        growth_rates: per stage, the channels each dense block adds.
        num_blocks: per stage, the number of dense blocks.
        downsample: per stage, whether its transition halves the feature map (the first
            stage has no transition: its value is ignored).
        se: per stage, whether its blocks end in effective squeeze-excitation.
        num_init_features: channels out of the stem.
        patch_size: the stem's kernel and stride, pixels.
        bottleneck_width_ratio: a block's expansion width over its input channels.
        transition_compression: a transition keeps this fraction of its channels (rounded down
            to a multiple of 8).
        ls_init_value: initial layer scale (``gamma``).
        num_classes: classifier outputs; 0 for none (``forward`` returns pooled features).
        in_channels: image channels.
        drop_rate: dropout before the classifier, in training.
        proj_drop_rate: dropout after each dense block, in training.
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 over all
            blocks.
        memory_efficient: train each dense stage in one buffer, recomputing its depthwise
            convolutions, LayerNorms and GELUs in backward (``densenet.nn.rdnet_memory``).
        arch: the registry name of this configuration, or None.

    Input (N, in_channels, H, W) float, H and W at least ``min_input_size``; output (N,
    num_classes) logits.
    """

    CLASSIFIER = "head.fc."
    STEM_WEIGHT = "stem.0.weight"

    def __init__(
        self,
        growth_rates: Sequence[int],
        num_blocks: Sequence[int],
        downsample: Sequence[bool],
        se: Sequence[bool],
        num_init_features: int = 64,
        patch_size: int = 4,
        bottleneck_width_ratio: float = 4.0,
        transition_compression: float = 0.5,
        ls_init_value: float = 1e-6,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        memory_efficient: bool = False,
        arch: str | None = None,
    ) -> None:
        super().__init__()
        rates = {"drop_rate": drop_rate, "proj_drop_rate": proj_drop_rate}
        rates["drop_path_rate"] = drop_path_rate
        _check_config(growth_rates, num_blocks, downsample, se, num_classes, in_channels, rates)
        self.config: dict[str, Any] = {
            "growth_rates": tuple(growth_rates),
            "num_blocks": tuple(num_blocks),
            "downsample": tuple(bool(d) for d in downsample),
            "se": tuple(bool(s) for s in se),
            "num_init_features": num_init_features,
            "patch_size": patch_size,
            "bottleneck_width_ratio": bottleneck_width_ratio,
            "transition_compression": transition_compression,
            "ls_init_value": ls_init_value,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "drop_rate": drop_rate,
            "proj_drop_rate": proj_drop_rate,
            "drop_path_rate": drop_path_rate,
        }
        self.arch = arch
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, num_init_features, patch_size, stride=patch_size),
            LayerNorm2d(num_init_features),
        )
        self.dense_stages, self.feature_info, self.stage_ends, channels = _dense_stages(self.config)
        self.num_features = channels
        self.num_classes = num_classes
        self.head = Head(channels, num_classes, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        self.set_memory_efficient(memory_efficient)

    def set_memory_efficient(self, enabled: bool | str = True) -> None:
        """Switch every dense stage to (or from) the memory-efficient training form
        (``densenet.nn.rdnet_memory``)."""
        if enabled not in (False, True):
            raise ValueError(
                f"an RDNet's memory_efficient is True or False, got {enabled!r} (the fused "
                "Triton kernels are the classic DenseNet's)"
            )
        for module in self.modules():
            if isinstance(module, DenseStage):
                module.memory_efficient = enabled
        self.memory_efficient = enabled

    @property
    def classifier(self) -> nn.Module:
        """The final Linear (``head.fc``; Identity without classes)."""
        return self.head.fc

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    @property
    def min_input_size(self) -> int:
        """The smallest input height and width, pixels (``rdnet_min_input_size``)."""
        return rdnet_min_input_size(self.config)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` outputs
        (0: none); the head's LayerNorm stays."""
        self.head.fc = new_classifier(self.num_features, num_classes)
        self.num_classes = num_classes
        self.config = {**self.config, "num_classes": num_classes}

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_features, H / r, W / r), the last stage's output
        (r = ``feature_info[-1]["reduction"]``, 32 for the published models)."""
        return self.dense_stages(self.stem(x))

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """(N, in_channels, H, W) -> the output of each stage in ``feature_info`` (the last of
        each scale), shapes as it says; the last one is ``forward_features``."""
        return _stage_outputs(self.stem, self.dense_stages, self.stage_ends, x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(N, num_features, h, w) -> pooled and normalised (N, num_features), then logits
        (N, num_classes) unless ``pre_logits``."""
        return self.head(x, pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    def cam_features(self, x: Tensor) -> Tensor:
        """The last stage's map normalised with the LayerNorm statistics of its pooled vector
        (mean m and variance v over channels, per image): ``(F - m) / sqrt(v + eps) * w + b``
        is affine in F, so its spatial mean is the head's normalised pooled features, and
        ``fc`` of each pixel is a class activation map whose mean is the logit."""
        features = self.forward_features(x)
        pooled = features.mean((2, 3), keepdim=True)
        variance, mean = torch.var_mean(pooled, 1, correction=0, keepdim=True)
        norm = self.head.norm
        normalised = (features - mean) / torch.sqrt(variance + norm.eps)
        return normalised * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def _dense_stages(
    config: dict[str, Any],
) -> tuple[nn.Sequential, list[dict[str, Any]], list[int], int]:
    """The dense stages of an RDNet ``config`` (each after its transition but the first), the
    ``feature_info`` of the last stage at each scale, those stages' indices, and the channels
    out."""
    growth_rates, num_blocks = config["growth_rates"], config["num_blocks"]
    downsample, se = config["downsample"], config["se"]
    path_rates = torch.linspace(0, config["drop_path_rate"], sum(num_blocks), device="cpu").tolist()
    channels, reduction = config["num_init_features"], config["patch_size"]
    stages: list[nn.Module] = []
    feature_info: list[dict[str, Any]] = []
    stage_ends: list[int] = []
    for i, (growth, blocks) in enumerate(zip(growth_rates, num_blocks)):
        parts: list[nn.Module] = []
        if i > 0:
            compressed = int(channels * config["transition_compression"] / 8) * 8
            side = 2 if downsample[i] else 1
            reduction *= side
            parts += [LayerNorm2d(channels), nn.Conv2d(channels, compressed, side, side)]
            channels = compressed
        stage = DenseStage()
        for j in range(blocks):
            block = DenseBlock(
                channels + j * growth,
                growth,
                config["bottleneck_width_ratio"],
                se[i],
                config["ls_init_value"],
                path_rates.pop(0),
                config["proj_drop_rate"],
            )
            stage.add_module(f"dense_block{j}", block)
        stages.append(nn.Sequential(*parts, stage))
        channels += blocks * growth
        if i == len(growth_rates) - 1 or downsample[i + 1]:  # the last stage at a scale
            feature_info.append(
                {"num_chs": channels, "reduction": reduction, "module": f"dense_stages.{i}"}
            )
            stage_ends.append(i)
    return nn.Sequential(*stages), feature_info, stage_ends, channels


def _stage_outputs(
    stem: nn.Module, stages: nn.Sequential, ends: Sequence[int], x: Tensor
) -> list[Tensor]:
    """The outputs of the stages numbered in ``ends``, in order."""
    maps = []
    x = stem(x)
    for i, stage in enumerate(stages):
        x = stage(x)
        if i in ends:
            maps.append(x)
    return maps


class RDNetFeatures(nn.Module):
    """An RDNet as a backbone: the stage outputs ``out_indices`` of ``feature_info`` (default
    all; negative counts from the end), without the head; ``stem`` and ``dense_stages`` are the
    model's own (its state_dict keys), up to the last stage needed.
    Input (N, in_channels, H, W); output a list of (N, num_chs, H / reduction, W / reduction).
    """

    def __init__(self, model: RDNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.out_indices = take_indices(len(model.feature_info), out_indices, "stage")
        self.feature_info = [model.feature_info[i] for i in self.out_indices]
        self.stage_ends = [model.stage_ends[i] for i in self.out_indices]
        self.stem = model.stem
        self.dense_stages = model.dense_stages[: max(self.stage_ends) + 1]
        self.config = {**model.config, "num_classes": 0}

    def forward(self, x: Tensor) -> list[Tensor]:
        return _stage_outputs(self.stem, self.dense_stages, self.stage_ends, x)


def _check_config(
    growth_rates: Sequence[int],
    num_blocks: Sequence[int],
    downsample: Sequence[bool],
    se: Sequence[bool],
    num_classes: int,
    in_channels: int,
    rates: dict[str, float],
) -> None:
    stages = len(growth_rates)
    if not stages or any(len(s) != stages for s in (num_blocks, downsample, se)):
        raise ValueError(
            "growth_rates, num_blocks, downsample and se must give one value per stage "
            f"(got {len(growth_rates)}, {len(num_blocks)}, {len(downsample)}, {len(se)})"
        )
    for name, values in (("growth_rates", growth_rates), ("num_blocks", num_blocks)):
        if any(not isinstance(n, int) or n < 1 for n in values):
            raise ValueError(f"{name} must be positive integers, got {tuple(values)!r}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    for name, rate in rates.items():
        if not 0 <= rate < 1:
            raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
