"""The set-up of a training run: seeds and determinism, its data (splits checked against what the
model takes, the settings that depend on them), its model's arguments and card, the optimiser."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import torch
from torch import Tensor, nn

from densenet.data.card import ModelCard, Preprocessing
from densenet.data.datasets import ModelInput, load_splits
from densenet.data.transforms import ChannelError, channel_stats, to_channels
from densenet.data.volumes import VolumeTransform
from densenet.errors import DenseNetError
from densenet.tasks.multilabel import label_splits
from densenet.train.config import TrainConfig, base_lr, eval_resize


class TrainingError(DenseNetError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def make_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW at ``base_lr(config)`` with ``weight_decay``; AdamW
    leaves 1-D weights (norms, biases, layer scales) undecayed."""
    lr = base_lr(config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            net.parameters(),
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    params = list(net.parameters())
    groups = [
        {"params": [p for p in params if p.dim() > 1]},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


def seed_and_determinism(config: TrainConfig, device: torch.device) -> None:
    """Seed Python's and torch's generators; deterministic algorithms when asked, else cuDNN's
    autotuner on a GPU."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    random.seed(config.seed)
    torch.manual_seed(config.seed)


def _takes(config: TrainConfig) -> ModelInput:
    """What the run's model takes: volumes with ``volume_size`` (of ``in_channels``, else of
    the training volumes' own), else images."""
    if config.volume_size is None:
        return ModelInput(what="a run without --volume-size (a 2D model)")
    given = f" and --in-channels {config.in_channels}" if config.in_channels else ""
    return ModelInput(True, config.in_channels, f"a run with --volume-size{given} (a 3D model)")


def load_data(config: TrainConfig) -> Any:
    """The run's splits (a labels CSV's, or ``load_splits``'), every file checked to be of the
    kind the model takes."""
    if config.labels is None:
        return load_splits(
            config.data,  # type: ignore[arg-type]
            config.data_root,
            config.download,
            config.holdout,
            config.seed,
            config.allow_empty_classes,
            _takes(config),
        )
    splits = label_splits(config.labels, config.data, config.val_labels)  # type: ignore[arg-type]
    parts = [part for part in (splits.train, splits.val, splits.test) if part is not None]
    _takes(config).check(f for part in parts for f in part.table.files)  # type: ignore[attr-defined]
    return splits


def first_sample(splits: Any) -> Any:
    """The first readable training image (PIL) or volume ((C, D, H, W) tensor), or None."""
    train = splits.train
    first = next((item for i in range(len(train)) if (item := train[i]) is not None), None)
    return None if first is None else first[0]


def resolve(config: TrainConfig, splits: Any, sample: Any, device: torch.device) -> TrainConfig:
    """``config`` with its defaults that depend on the data and the device filled in."""
    volumes = isinstance(sample, Tensor) and config.volume_size is not None
    channels = config.in_channels or (sample.shape[0] if volumes else 3)
    return dataclasses.replace(
        config,
        out=config.out or os.path.join("runs", config.recipe),
        resize_size=config.resize_size or eval_resize(config),
        in_channels=channels,
        mean=tuple(config.mean or channel_stats(splits.mean, channels)),
        std=tuple(config.std or channel_stats(splits.std, channels)),
        channels_last=(
            device.type == "cuda" if config.channels_last is None else config.channels_last
        ),
    )


def check_sample(config: TrainConfig, splits: Any, sample: Any) -> None:
    """One clear error, before training, when the first readable training image cannot be
    given the model's input channels (``to_channels``). The kind of every file, and a
    volume's channels, are checked when the data are opened (``load_data``)."""
    if sample is None or config.volume_size is not None:
        return
    try:
        to_channels(sample, config.in_channels)  # type: ignore[arg-type]
    except ChannelError as error:
        raise TrainingError(f"training data of {splits.name}: {error}") from None


def model_args(config: TrainConfig, classes: Any) -> dict[str, Any]:
    """The arguments of the run's network (besides its name and weights), as checkpoints keep
    them."""
    return {
        "num_classes": len(classes),
        "drop_rate": config.drop_rate,
        "in_channels": config.in_channels,
        **({"drop_path_rate": config.drop_path_rate} if config.drop_path_rate else {}),
        **({"spatial_dims": 3} if config.volume_size is not None else {}),
        **config.model_args,
    }


def model_card(config: TrainConfig, classes: Any, net: nn.Module) -> ModelCard:
    """The card of the run's network ``net``: classes, preprocessing, the labels' thresholds,
    and a 3D run's volume transform."""
    side = net.min_input_size
    size = (side, side)
    preprocessing = Preprocessing(
        config.resize_size, config.image_size, mean=config.mean, std=config.std, min_size=size
    )  # type: ignore[arg-type]
    thresholds = _thresholds(config, classes)
    volume = None
    if config.volume_size is not None:
        volume = VolumeTransform(config.volume_size, config.window)  # type: ignore[arg-type]
    return ModelCard(
        tuple(classes),
        preprocessing,
        multi_label=config.labels is not None,
        thresholds=thresholds,
        in_channels=net.config["in_channels"],
        arch=config.model,
        volume=volume,
    )


def _thresholds(config: TrainConfig, labels: Any) -> tuple[float, ...] | None:
    """The configured per-label thresholds, one per label."""
    thresholds = config.thresholds
    if thresholds is not None and len(thresholds) != len(labels):
        raise TrainingError(
            f"{len(thresholds)} thresholds for {len(labels)} labels ({', '.join(labels)})"
        )
    return thresholds
