"""Training configuration: ``TrainConfig`` (every setting of a run), the paper's recipes as data
(``RECIPES``), and the one way to override a setting (``make_config``, fed by ``parse_value``
for text from the command line)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from densenet.data.transforms import AUGMENTATIONS
from densenet.data.volumes import VolumeTransform, available_memory
from densenet.infer.runtime import AMP_MODES
from densenet.nn.model import DenseNet
from densenet.nn.registry import get_model, network_of


@dataclass
class TrainConfig:
    """Everything that defines a training run. The recipe fields come from ``RECIPES``; any
    field can be overridden (``make_config``, ``densenet train --set key=value``)."""

    recipe: str = "custom"
    model: str = "densenet_bc_100_k12"
    data: str | None = None  # a named dataset (cifar10, cifar100, svhn) or a train/ + val/ folder
    epochs: int = 300
    batch_size: int = 64  # global: over all processes and accumulated micro-batches
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    # fractions of the epochs; at each, lr *= lr_gamma
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.1
    # lr is for this global batch, scaled linearly to batch_size (None: lr as it is)
    lr_batch: int | None = None
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov) or "adamw" (no decay on 1-D weights)
    schedule: str = "step"  # "step": lr_milestones; "cosine": to 0 after the warm-up
    warmup_epochs: int = 0  # the lr rises linearly over these first epochs
    label_smoothing: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth (RDNet)
    augment: str = "crop-flip"  # see densenet.data.transforms.train_transform (volumes: "none", or
    # any other for densenet.data.volumes.VolumeAugment's random shifts and flips)
    image_size: int = 32  # training crop and evaluation crop, pixels
    # evaluation: resize the shorter side to this, then crop image_size (None: image_size *
    # 256 / 224 with "imagenet" augmentation, else image_size)
    resize_size: int | None = None
    mean: tuple[float, ...] | None = None  # None: the data set's
    std: tuple[float, ...] | None = None
    holdout: int = 0  # training images held out for validation (named datasets)
    weights: str | None = None  # start from these weights (a registry name or a file)
    # input channels (1: grayscale; pretrained stem kernels are adapted); None: 3 for images,
    # the first training volume's for volumes
    in_channels: int | None = None
    # volumes (NIfTI or .npy files in the class folders or the labels CSV) for a 3D model: each
    # resampled to volume_size (D, H, W voxels; None: the data are images) and z-scored, or
    # clipped to a window (low, high), e.g. a CT window in Hounsfield units, and scaled to [0, 1]
    volume_size: tuple[int, ...] | None = None
    window: tuple[float, ...] | None = None
    # multi-label: a CSV of files (relative to data) and labels (densenet.tasks.multilabel); sigmoid
    # outputs, binary cross-entropy, the best epoch by mean validation AUROC
    labels: str | None = None
    val_labels: str | None = None  # the validation images' CSV, when labels has no split column
    pos_weight: str | None = None  # "auto": BCE weights negatives / positives per label
    thresholds: tuple[float, ...] | None = None  # per label, stored in the card (None: 0.5)
    model_args: dict[str, Any] = field(default_factory=dict)  # DenseNet(...) arguments to override
    allow_empty_classes: bool = False  # a folder's classes without training images (refused)
    seed: int = 0
    accumulate: int = 1  # micro-batches per optimizer step, per process
    sync_bn: bool = False
    # run options: they may differ when a run is resumed (so may the data's location, not its
    # classes)
    amp: str = "auto"  # auto (bf16 on a GPU that has it, else float32), none, bf16, fp16
    channels_last: bool | None = None  # None: on GPU
    compile: bool = False
    memory_efficient: bool | str = False  # True (densenet.nn.memory); "triton": its CUDA kernels
    deterministic: bool = False
    out: str | None = None  # None: runs/<recipe>
    data_root: str | None = None
    download: bool = False
    workers: int = 4
    device: str = "auto"
    eval_batch_size: int | None = None  # None: batch_size
    checkpoint_every_steps: int = 0  # also checkpoint inside epochs every this many steps
    # an epoch fails when more than this fraction of its training images cannot be read
    max_unreadable: float = 0.1
    progress: bool = True


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")

RUN_OPTIONS = frozenset(
    {
        "amp",
        "channels_last",
        "compile",
        "memory_efficient",
        "deterministic",
        "out",
        "data",
        "data_root",
        "download",
        "workers",
        "device",
        "eval_batch_size",
        "checkpoint_every_steps",
        "progress",
        "max_unreadable",
    }
)


def _cifar(data: str, augmented: bool) -> TrainConfig:
    """Paper section 4.2: batch 64, 300 epochs, lr 0.1 / 10 at 50% and 75%; dropout 0.2 without
    augmentation; "+" is zero-pad 4, random crop 32, horizontal flip."""
    return TrainConfig(
        recipe=data + ("+" if augmented else ""),
        model="densenet_bc_100_k12",
        data=data,
        epochs=300,
        batch_size=64,
        lr=0.1,
        lr_milestones=(0.5, 0.75),
        drop_rate=0.0 if augmented else 0.2,
        augment="crop-flip" if augmented else "none",
        image_size=32,
    )


RECIPES: dict[str, TrainConfig] = {
    "cifar10": _cifar("cifar10", augmented=False),
    "cifar10+": _cifar("cifar10", augmented=True),
    "cifar100": _cifar("cifar100", augmented=False),
    "cifar100+": _cifar("cifar100", augmented=True),
    # SVHN: train + extra, no augmentation, pixels / 255, 6,000 training images held out for
    # validation (the best epoch's model is then tested), 40 epochs, dropout 0.2.
    "svhn": dataclasses.replace(
        _cifar("svhn", augmented=False), recipe="svhn", epochs=40, holdout=6000
    ),
    # ImageNet: batch 256, 90 epochs, lr 0.1 / 10 at epochs 30 and 60; random-resized crop 224,
    # colour jitter, lighting noise, flip; evaluation resize 256, center crop 224.
    "imagenet": TrainConfig(
        recipe="imagenet",
        model="densenet121",
        epochs=90,
        batch_size=256,
        lr=0.1,
        lr_milestones=(1 / 3, 2 / 3),
        augment="imagenet",
        image_size=224,
    ),
    # RDNet's (Kim et al., ECCV 2024): AdamW, lr 4e-3 for a batch of 4096 (scaled linearly to
    # batch_size), weight decay 0.05, cosine after 20 warm-up epochs, stochastic depth 0.1 (more
    # for the larger models), label smoothing 0.1, 300 epochs; random-resized crop 224.
    "rdnet": TrainConfig(
        recipe="rdnet",
        model="rdnet_tiny",
        epochs=300,
        batch_size=1024,
        lr=4e-3,
        lr_batch=4096,
        optimizer="adamw",
        weight_decay=0.05,
        schedule="cosine",
        warmup_epochs=20,
        label_smoothing=0.1,
        drop_path_rate=0.1,
        augment="imagenet",
        image_size=224,
    ),
    # Not from the paper: the official ImageNet weights, a new classifier for the folder's
    # classes, lr 0.01 / 10 after two thirds of 15 epochs.
    "finetune": TrainConfig(
        recipe="finetune",
        model="densenet121",
        weights="DEFAULT",
        epochs=15,
        batch_size=64,
        lr=0.01,
        lr_milestones=(2 / 3,),
        augment="imagenet",
        image_size=224,
    ),
}


def parse_value(name: str, text: str) -> Any:
    """``text`` (a command-line flag's or ``--set``'s) as a value of ``TrainConfig.<name>``'s
    type: the one parser behind every way of overriding a setting. For a union (``X | None``,
    ``bool | str``) the first type that reads the text wins; "none" is None where allowed."""
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise ValueError(
            f"unknown setting {name!r}; settings: {', '.join(f.name for f in dataclasses.fields(TrainConfig))}"
        )
    hint = hints[name]
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in kinds and text.strip().lower() in ("none", "null", ""):
        return None
    for kind in kinds:
        try:
            return _parse_as(kind, text)
        except (ValueError, json.JSONDecodeError):
            continue
    raise ValueError(f"setting {name}={text!r} is not a valid {hint}")


def _parse_as(kind: Any, text: str) -> Any:
    origin = typing.get_origin(kind) or kind
    if origin is type(None):
        raise ValueError(text)
    if origin is bool:
        if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(text)
        return text.strip().lower() in ("true", "1", "yes", "on")
    if origin is tuple:
        items = json.loads(text) if text.strip().startswith("[") else text.split(",")
        item = typing.get_args(kind)[0]  # tuple[int, ...] or tuple[float, ...]
        return tuple(item(x) for x in items)
    if origin is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(text)
        return value
    return origin(text)


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, typed value)`` for ``make_config``."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--set takes key=value, got {item!r}")
    key = key.strip().replace("-", "_")
    return key, parse_value(key, value)


def make_config(recipe: str, **overrides: Any) -> TrainConfig:
    """The recipe's configuration with ``overrides`` applied."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    values = dict(overrides)
    if values.get("lr_milestones") is not None:
        values["lr_milestones"] = tuple(values["lr_milestones"])
    config = dataclasses.replace(RECIPES[recipe], **values)
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {config.augment!r}")
    if config.memory_efficient not in (False, True, "triton"):
        raise ValueError(
            f'memory_efficient must be true, false or "triton", got {config.memory_efficient!r}'
        )
    if config.amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {config.amp!r}")
    for name in ("epochs", "batch_size", "image_size", "accumulate", "in_channels", "lr_batch"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    for name in ("label_smoothing", "drop_path_rate"):
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if config.warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be at least 0, got {config.warmup_epochs}")
    _check_volume(config)
    if config.pos_weight not in (None, "auto"):
        raise ValueError(f"pos_weight must be auto or none, got {config.pos_weight!r}")
    if config.labels is None and (config.val_labels or config.pos_weight or config.thresholds):
        raise ValueError(
            "val_labels, pos_weight and thresholds apply to multi-label training (--labels)"
        )
    network = network_of(config.model)[0]
    accepted = set(inspect.signature(network).parameters)
    unknown = sorted(set(config.model_args) - accepted)
    if unknown:
        raise ValueError(
            f"model_args: unknown {network.__name__} argument(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(accepted))}"
        )
    if config.drop_path_rate and "drop_path_rate" not in accepted:
        raise ValueError(
            f"drop_path_rate (stochastic depth) applies to RDNet, not {config.model}; drop it"
        )
    _check_input_size(config)
    if config.out is not None and Path(config.out).exists() and not Path(config.out).is_dir():
        raise ValueError(f"out {config.out} is a file; give a folder for the run")
    if not 0 <= config.max_unreadable < 1:
        raise ValueError(f"max_unreadable must be in [0, 1), got {config.max_unreadable}")
    if config.data is None:
        raise ValueError(
            f"recipe {config.recipe} needs data: a named dataset or a folder with train/ and val/"
        )


def _check_volume(config: TrainConfig) -> None:
    if config.volume_size is None:
        if config.window is not None:
            raise ValueError("window applies to volumes: give volume_size (D,H,W) too")
        return
    if config.window is not None and len(config.window) != 2:
        raise ValueError(f"window takes two values, low,high; got {config.window}")
    VolumeTransform(config.volume_size, config.window)  # type: ignore[arg-type]  # checks both
    if config.model_args.get("spatial_dims", 3) != 3:
        raise ValueError(
            f"volume_size trains a 3D model; model_args has spatial_dims="
            f"{config.model_args['spatial_dims']}"
        )


def _check_input_size(config: TrainConfig) -> None:
    """Refuse a crop or volume size smaller than the model's smallest input, or one whose batch
    cannot fit in memory (the network is built on the meta device: no memory, no weights)."""
    volumes = config.volume_size is not None
    with torch.device("meta"):
        net = get_model(
            config.model, **{**({"spatial_dims": 3} if volumes else {}), **config.model_args}
        )
    side = net.min_input_size
    if not volumes:
        if config.image_size < side:
            raise ValueError(
                f"image_size {config.image_size} is below the smallest input of {config.model} "
                f"({side}x{side} pixels); give at least {side}"
            )
        _check_batch_memory(config, net, (config.image_size,) * 2)
        return
    # an axis the ImageNet stem keeps (stride 1) is halved by the transitions only
    kept = 2 ** (len(net.config["block_config"]) - 1)
    strides = net.config.get("stem_stride", (2, 2, 2))
    least = tuple(side if stride == 2 else kept for stride in strides)
    if any(n < m for n, m in zip(config.volume_size, least)):
        raise ValueError(
            f"volume_size {tuple(config.volume_size)} is below the smallest input of "
            f"{config.model} ({least} voxels, D, H, W); give at least that"
        )
    _check_batch_memory(config, net, tuple(config.volume_size))


def _check_batch_memory(config: TrainConfig, net: DenseNet, size: tuple[int, ...]) -> None:
    """Refuse a batch whose stem output alone (the first of the activations training keeps, at
    2 bytes a value) exceeds the memory available: a lower bound of what the step needs."""
    imagenet = net.config.get("stem") == "imagenet"
    strides = net.config.get("stem_stride", (2,) * len(size)) if imagenet else (1,) * len(size)
    if "patch_size" in net.config:  # RDNet's patchify stem
        strides = (net.config["patch_size"],) * len(size)
    values = net.config["num_init_features"] * math.prod(-(-n // s) for n, s in zip(size, strides))
    needed, available = config.batch_size * values * 2, available_memory()
    if available is not None and needed > available:
        flag = "image_size" if len(size) == 2 else "volume_size"
        raise ValueError(
            f"a batch of {config.batch_size} at {flag} {size} needs at least {needed / 2**30:,.1f} "
            f"GiB for its stem's output alone, more than the {available / 2**30:,.1f} GiB of "
            f"memory available; lower {flag} or batch_size"
        )


def base_lr(config: TrainConfig) -> float:
    """``lr``, scaled linearly from a batch of ``lr_batch`` to ``batch_size`` when given."""
    return config.lr * config.batch_size / config.lr_batch if config.lr_batch else config.lr


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (from 0) as a fraction of ``base_lr``: rising
    linearly over ``warmup_epochs`` (``(epoch + 1) / warmup_epochs``), then ``lr_gamma`` per
    milestone passed (``schedule="step"``) or a cosine from 1 to 0 over the epochs left."""
    warmup = config.warmup_epochs
    if epoch < warmup:
        return (epoch + 1) / warmup
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, config.epochs - warmup)))
    return config.lr_gamma ** sum(epoch >= m for m in milestone_epochs(config))


def milestone_epochs(config: TrainConfig) -> list[int]:
    """The epochs (counted from 0) from which the learning rate is multiplied by ``lr_gamma``
    once more: ``lr_milestones`` as fractions of ``epochs``, at least 1."""
    return [max(1, round(f * config.epochs)) for f in config.lr_milestones]


def eval_resize(config: TrainConfig) -> int:
    """The evaluation resize for ``image_size``: ImageNet's 256 for 224 (ratio 0.875) with
    ImageNet augmentation, else the crop size itself (small images are not cropped)."""
    if config.augment == "imagenet":
        return round(config.image_size * 256 / 224)
    return config.image_size


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The configuration as JSON-ready values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
