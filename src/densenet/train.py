"""Training: the paper's recipes as data (``RECIPES``), the training loop (mixed precision,
channels_last, ``torch.compile``, memory-efficient blocks, gradient accumulation,
DistributedDataParallel under ``torchrun``), per-epoch validation and metrics, and atomic
checkpoints from which ``train(config, resume=True)`` continues after a crash or a kill.

On CPU with ``deterministic=True`` and ``workers=0``, a run killed at any moment and resumed
ends with exactly the weights of an uninterrupted run: the data order is a permutation seeded by
``(seed, epoch)``, each image's augmentation has its own seed (``densenet.data.sample_seed``),
and the checkpoints hold the optimizer, scheduler, scaler, step and random-number states.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .data import (
    ShardedBatchSampler,
    TransformedDataset,
    collate,
    load_splits,
    shard_indices,
)
from .evaluate import EvalResult, evaluate
from .transforms import AUGMENTATIONS, eval_transform, train_transform
from .weights import WeightsError, read_torch_file

__all__ = [
    "RECIPES",
    "CheckpointError",
    "TrainConfig",
    "TrainingError",
    "make_config",
    "milestone_epochs",
    "parse_override",
    "read_checkpoint",
    "save_checkpoint",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "densenet-train-1"
AMP_MODES = ("auto", "none", "bf16", "fp16")


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be written or read."""


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
    drop_rate: float = 0.0
    augment: str = "crop-flip"  # see densenet.transforms.train_transform
    image_size: int = 32  # training crop and evaluation crop, pixels
    # evaluation: resize the shorter side to this, then crop image_size (None: image_size *
    # 256 / 224 with "imagenet" augmentation, else image_size)
    resize_size: int | None = None
    mean: tuple[float, ...] | None = None  # None: the data set's
    std: tuple[float, ...] | None = None
    holdout: int = 0  # training images held out for validation (named datasets)
    weights: str | None = None  # start from these weights (a registry name or a file)
    model_args: dict[str, Any] = field(default_factory=dict)  # DenseNet(...) arguments to override
    seed: int = 0
    accumulate: int = 1  # micro-batches per optimizer step, per process
    sync_bn: bool = False
    # run options: they may differ when a run is resumed (so may the data's location, not its
    # classes)
    amp: str = "auto"  # auto (bf16 on a GPU that has it, else float32), none, bf16, fp16
    channels_last: bool | None = None  # None: on GPU
    compile: bool = False
    memory_efficient: bool = False
    deterministic: bool = False
    out: str | None = None  # None: runs/<recipe>
    data_root: str | None = None
    download: bool = False
    workers: int = 4
    device: str = "auto"
    eval_batch_size: int | None = None  # None: batch_size
    checkpoint_every_steps: int = 0  # also checkpoint inside epochs every this many steps
    progress: bool = True


RUN_OPTIONS = frozenset(
    {
        "amp", "channels_last", "compile", "memory_efficient", "deterministic", "out", "data",
        "data_root", "download", "workers", "device", "eval_batch_size",
        "checkpoint_every_steps", "progress",
    }
)  # fmt: skip


def _cifar(data: str, augmented: bool) -> TrainConfig:
    """Paper section 4.2: batch 64, 300 epochs, lr 0.1 / 10 at 50% and 75%; dropout 0.2 without
    augmentation; "+" is zero-pad 4, random crop 32, horizontal flip."""
    return TrainConfig(
        recipe=data + ("+" if augmented else ""), model="densenet_bc_100_k12", data=data,
        epochs=300, batch_size=64, lr=0.1, lr_milestones=(0.5, 0.75),
        drop_rate=0.0 if augmented else 0.2, augment="crop-flip" if augmented else "none",
        image_size=32,
    )  # fmt: skip


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


def _coerce(name: str, text: str) -> Any:
    """``text`` (from the command line) as a value of ``TrainConfig.<name>``'s type."""
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise ValueError(
            f"unknown setting {name!r}; settings: {', '.join(f.name for f in dataclasses.fields(TrainConfig))}"
        )
    hint = hints[name]
    kind = hint
    if isinstance(hint, types.UnionType):  # X | None
        if text.strip().lower() in ("none", "null", ""):
            return None
        kind = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(kind) or kind
    try:
        if origin is bool:
            if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return text.strip().lower() in ("true", "1", "yes", "on")
        if origin is tuple:
            items = json.loads(text) if text.strip().startswith("[") else text.split(",")
            return tuple(float(x) for x in items)
        if origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        return origin(text)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"setting {name}={text!r} is not a valid {hint}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, typed value)`` for ``make_config``."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--set takes key=value, got {item!r}")
    key = key.strip().replace("-", "_")
    return key, _coerce(key, value)


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
    _check_config(config)
    return config


def _check_config(config: TrainConfig) -> None:
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {config.augment!r}")
    if config.amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {config.amp!r}")
    for name in ("epochs", "batch_size", "image_size", "accumulate"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.data is None:
        raise ValueError(
            f"recipe {config.recipe} needs data: a named dataset or a folder with train/ and val/"
        )


def milestone_epochs(config: TrainConfig) -> list[int]:
    """The epochs (counted from 0) from which the learning rate is multiplied by ``lr_gamma``
    once more: ``lr_milestones`` as fractions of ``epochs``, at least 1."""
    return [max(1, round(f * config.epochs)) for f in config.lr_milestones]


def _resize_size(config: TrainConfig) -> int:
    """The evaluation resize for ``image_size``: ImageNet's 256 for 224 (ratio 0.875) with
    ImageNet augmentation, else the crop size itself (small images are not cropped)."""
    if config.augment == "imagenet":
        return round(config.image_size * 256 / 224)
    return config.image_size


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The configuration as JSON-ready values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that ``amp`` (``AMP_MODES``) means on ``device``; None for float32."""
    if amp == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda else None
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def distributed_setup(device: str = "auto") -> tuple[int, int, torch.device | None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) join the default process group (NCCL on GPUs,
    gloo on CPU) and return ``(rank, world_size, this process's device)``; else ``(0, 1, None)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, None
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), target


@contextmanager
def process_group(device: str = "auto") -> Iterator[tuple[int, int, torch.device | None]]:
    """``distributed_setup(device)`` for the duration of a ``with`` block, leaving the process
    group at the end if the block joined it."""
    import torch.distributed as dist

    joined = dist.is_available() and not dist.is_initialized()
    try:
        yield distributed_setup(device)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


# ---- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over ``path``. On failure (a full disk...) ``path`` keeps its previous
    content, the temporary file is removed and ``CheckpointError`` says what happened."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        kept = "the previous checkpoint there is intact" if path.exists() else "nothing was written"
        raise CheckpointError(
            f"cannot write checkpoint {path} ({reason}); {kept}. Free disk space and continue "
            "with --resume"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's content (``torch.load(weights_only=True)``, on the CPU)."""
    try:
        state = read_torch_file(path, what="checkpoint")
    except WeightsError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _rng_state() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )


# ---- the run -------------------------------------------------------------------------------


class _Run:
    """One training run: set-up, resume, epochs, validation, checkpoints."""

    def __init__(self, config: TrainConfig, resume: bool) -> None:
        _check_config(config)
        from .predict import resolve_device
        from .registry import get_model

        self.rank, self.world_size, device = distributed_setup(config.device)
        self.device = device if device is not None else resolve_device(config.device)
        self.main = self.rank == 0
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        random.seed(config.seed)
        torch.manual_seed(config.seed)

        splits = load_splits(
            config.data, config.data_root, config.download, config.holdout, config.seed
        )  # type: ignore[arg-type]
        self.splits = splits
        config = dataclasses.replace(
            config,
            out=config.out or os.path.join("runs", config.recipe),
            resize_size=config.resize_size or _resize_size(config),
            mean=tuple(config.mean or splits.mean),
            std=tuple(config.std or splits.std),
            channels_last=(
                self.device.type == "cuda" if config.channels_last is None else config.channels_last
            ),
        )
        self.config = config
        self.out = Path(config.out)  # type: ignore[arg-type]
        self.last_path, self.best_path = self.out / "last.pth", self.out / "best.pth"
        self.metrics_path = self.out / "metrics.jsonl"
        if self.last_path.exists() and not resume:
            raise TrainingError(
                f"{self.out} already holds a run ({self.last_path}); continue it with --resume "
                "or choose another --out"
            )
        if resume and not self.last_path.exists():
            raise TrainingError(f"nothing to resume: {self.last_path} does not exist")

        self.model_args = {
            "num_classes": len(splits.classes),
            "drop_rate": config.drop_rate,
            **config.model_args,
        }
        torch.manual_seed(config.seed)
        net = get_model(config.model, weights=config.weights, **self.model_args)
        if config.memory_efficient:
            net.set_memory_efficient(True)
        if config.sync_bn and self.world_size > 1:
            if self.device.type != "cuda":
                raise TrainingError("sync_bn needs CUDA GPUs; SyncBatchNorm does not run on CPU")
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = net.to(self.device)
        if config.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.optimizer = torch.optim.SGD(
            net.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )  # fmt: skip
        milestones = milestone_epochs(config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: config.lr_gamma ** sum(epoch >= m for m in milestones)
        )
        self.amp_dtype = amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype is torch.float16
        )
        model: nn.Module = net
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(net, device_ids=ids)
        self.ddp = self.world_size > 1
        self.model = torch.compile(model) if config.compile else model

        self.epoch = self.step = self.global_step = 0
        self.best_acc1, self.best_epoch = -1.0, 0
        self.meter = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, images, skipped
        self.rng: dict[str, Any] | None = None
        self._build_loaders()
        if resume:
            self._resume()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "config.json", config_dict(config))
        self.writer = _tensorboard(self.out / "tensorboard") if self.main else None

    def _build_loaders(self) -> None:
        config, splits = self.config, self.splits
        train_set = TransformedDataset(
            splits.train,
            train_transform(config.augment, config.image_size, config.mean, config.std),  # type: ignore[arg-type]
            seed=config.seed,
        )
        self.sampler = ShardedBatchSampler(
            len(train_set), config.batch_size, seed=config.seed, rank=self.rank,
            world_size=self.world_size, accumulate=config.accumulate,
        )  # fmt: skip
        cuda = self.device.type == "cuda"
        self.train_loader = DataLoader(
            train_set, batch_sampler=self.sampler, num_workers=config.workers, collate_fn=collate,
            pin_memory=cuda, persistent_workers=config.workers > 0,
            generator=torch.Generator().manual_seed(config.seed),
        )  # fmt: skip
        evaluation = eval_transform(config.resize_size, config.image_size, config.mean, config.std)  # type: ignore[arg-type]
        self.eval_loaders = {
            name: self._eval_loader(dataset, evaluation)
            for name, dataset in (("val", splits.val), ("test", splits.test))
            if dataset is not None
        }

    def _eval_loader(self, dataset, transform) -> DataLoader:
        dataset = TransformedDataset(dataset, transform)
        if self.world_size > 1:
            dataset = Subset(dataset, list(shard_indices(len(dataset), self.rank, self.world_size)))
        return DataLoader(
            dataset, batch_size=self.config.eval_batch_size or self.config.batch_size,
            num_workers=self.config.workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    # -- checkpoints --

    def _state(self) -> dict[str, Any]:
        config = self.config
        rng = _rng_state()
        if self.ddp:
            import torch.distributed as dist

            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, rng)
        else:
            ranks = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": config.model,
            "model_args": self.model_args,
            "num_classes": len(self.splits.classes),
            "classes": list(self.splits.classes),
            "transform": {
                "resize_size": config.resize_size,
                "crop_size": config.image_size,
                "mean": list(config.mean),  # type: ignore[arg-type]
                "std": list(config.std),  # type: ignore[arg-type]
            },
            "config": config_dict(config),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "best_acc1": self.best_acc1,
            "best_epoch": self.best_epoch,
            "meter": self.meter.tolist(),
            "rng": ranks,
        }

    def _save(self, best: bool = False) -> None:
        self._sync_buffers()
        state = self._state()  # every rank takes part (RNG states are gathered)
        if self.main:
            if best:  # best first: a kill between the two writes redoes this epoch
                save_checkpoint(state, self.best_path)
            save_checkpoint(state, self.last_path)

    def _resume(self) -> None:
        checkpoint = read_checkpoint(self.last_path)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{self.last_path} is not a densenet training checkpoint "
                f"(format {checkpoint.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
            )
        saved, current = checkpoint["config"], config_dict(self.config)
        differences = [
            f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
            for key, value in current.items()
            if key not in RUN_OPTIONS and saved.get(key) != value
        ]
        if checkpoint["classes"] != list(self.splits.classes):
            differences.append(
                f"classes: checkpoint {checkpoint['classes'][:5]}, data {self.splits.classes[:5]}"
            )
        if differences:
            raise CheckpointError(
                f"{self.last_path} belongs to another run ({'; '.join(differences[:4])}); "
                "resume with that run's settings or choose another --out"
            )
        self.net.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        self.global_step = checkpoint["global_step"]
        self.best_acc1, self.best_epoch = checkpoint["best_acc1"], checkpoint["best_epoch"]
        self.meter = torch.tensor(checkpoint["meter"], dtype=torch.float64)
        ranks = checkpoint["rng"]
        self.rng = ranks[self.rank] if len(ranks) == self.world_size else ranks[0]
        if self.main:  # temporary files of writes a kill interrupted
            for stale in self.out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        if self.main and self.metrics_path.exists():  # drop epochs done after this checkpoint
            kept = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    if json.loads(line)["epoch"] <= self.epoch:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            _write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        log.info("resuming %s at epoch %d, step %d", self.last_path, self.epoch + 1, self.step)

    def _sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm statistics (DDP keeps them per process)."""
        if self.ddp:
            import torch.distributed as dist

            for buffer in self.net.buffers():
                dist.broadcast(buffer, 0)

    # -- training --

    def _diverged(self, value: float) -> TrainingError:
        if self.last_path.exists():
            kept = f"the last good checkpoint, {self.last_path}, is kept"
        else:
            kept = "no checkpoint had been written yet"
        return TrainingError(
            f"loss is {value} at epoch {self.epoch + 1}, step {self.step + 1}: training diverged "
            f"and was stopped; {kept}. Lower the learning rate (or use --amp none) and resume"
        )

    def _train_step(self, batches) -> torch.Tensor:
        """One optimizer step over ``accumulate`` micro-batches; returns this step's global
        (loss sum, correct, images, skipped) as float64 on the CPU."""
        config = self.config
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(config.accumulate):
            images, labels, skipped = next(batches)
            stats[3] += skipped
            if labels.numel() == 0:
                continue
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last = micro == config.accumulate - 1
            no_sync = self.model.no_sync if self.ddp and not last else nullcontext
            with no_sync():
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    logits = self.model(images)
                loss = F.cross_entropy(logits.float(), labels)
                self.scaler.scale(loss / config.accumulate).backward()
            stats[0] += loss.detach() * labels.numel()
            stats[1] += (logits.argmax(dim=1) == labels).sum()
            stats[2] += labels.numel()
        if self.ddp:
            import torch.distributed as dist

            dist.all_reduce(stats)
        stats = stats.cpu()
        if not math.isfinite(stats[0].item()):
            raise self._diverged(stats[0].item() / max(stats[2].item(), 1))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return stats

    def _train_epoch(self) -> dict[str, float]:
        config = self.config
        steps = self.sampler.steps_per_epoch
        self.sampler.set_epoch(self.epoch, self.step)
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        start, seen = time.perf_counter(), 0.0
        batches = iter(self.train_loader)
        with tqdm(
            total=steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{config.epochs}",
            unit="step", disable=not (config.progress and self.main), leave=False,
        ) as bar:  # fmt: skip
            while self.step < steps:
                stats = self._train_step(batches)
                self.meter += stats
                self.step += 1
                self.global_step += 1
                seen += stats[2].item()
                loss_sum, correct, count, _ = self.meter.tolist()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum / max(count, 1):.4f}",
                    acc=f"{100 * correct / max(count, 1):.2f}%",
                    lr=f"{lr:.3g}",
                    img_s=f"{seen / (time.perf_counter() - start):.0f}",
                )
                every = config.checkpoint_every_steps
                if every and self.step % every == 0 and self.step < steps:
                    self._save()
        loss_sum, correct, count, skipped = self.meter.tolist()
        return {
            "train_loss": loss_sum / max(count, 1),
            "train_top1": 100 * correct / max(count, 1),
            "train_images": int(count),
            "train_skipped": int(skipped),
            "lr": lr,
            "images_per_second": seen / (time.perf_counter() - start),
        }

    def _evaluate(self, split: str) -> EvalResult:
        self._sync_buffers()
        return evaluate(
            self.net, self.eval_loaders[split], device=self.device, amp_dtype=self.amp_dtype,
            channels_last=bool(self.config.channels_last), distributed=self.ddp,
            progress=self.config.progress and self.main, desc=split,
        )  # fmt: skip

    def run(self) -> dict[str, Any]:
        config = self.config
        if self.rng is not None:
            _set_rng_state(self.rng)
        while self.epoch < config.epochs:
            started = time.perf_counter()
            record = self._train_epoch()
            self.scheduler.step()
            val = self._evaluate("val")
            self.epoch += 1
            self.step = 0
            self.meter.zero_()
            best = val.top1 > self.best_acc1
            if best:
                self.best_acc1, self.best_epoch = val.top1, self.epoch
            record = {
                "epoch": self.epoch,
                **record,
                "val_loss": val.loss,
                "val_top1": val.top1,
                "val_top5": val.top5,
                "val_images": val.images,
                "val_skipped": val.skipped,
                "seconds": time.perf_counter() - started,
            }
            if self.main:
                with open(self.metrics_path, "a") as file:
                    file.write(json.dumps(record) + "\n")
                if self.writer is not None:
                    for key, value in record.items():
                        if key != "epoch":
                            self.writer.add_scalar(key, value, self.epoch)
                    self.writer.flush()
                log.info(
                    "epoch %d/%d  train loss %.4f top-1 %.2f%%  val loss %.4f top-1 %.2f%% "
                    "top-5 %.2f%%  lr %.3g  %.0f img/s%s",
                    self.epoch, config.epochs, record["train_loss"], record["train_top1"],
                    val.loss, val.top1, val.top5, record["lr"], record["images_per_second"],
                    f"  ({record['train_skipped']} unreadable images skipped)"
                    if record["train_skipped"] else "",
                )  # fmt: skip
            self._save(best=best)
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "out": str(self.out),
            "epochs": self.config.epochs,
            "best_epoch": self.best_epoch,
            "best_val_top1": self.best_acc1,
            "last_checkpoint": str(self.last_path),
            "best_checkpoint": str(self.best_path),
        }
        if "test" in self.eval_loaders:  # the model of the best validation epoch, tested once
            if self.main:
                self.net.load_state_dict(read_checkpoint(self.best_path)["model"])
            if self.ddp:  # from rank 0: other nodes may not see its files
                import torch.distributed as dist

                for tensor in self.net.state_dict().values():
                    dist.broadcast(tensor, 0)
            summary["test"] = self._evaluate("test").to_dict()
        if self.main:
            _write_json(self.out / "results.json", summary)
            if self.writer is not None:
                self.writer.close()
        return summary


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume``, continue from ``<out>/last.pth``) the training ``config``
    describes; under ``torchrun`` every process calls this. Writes into ``config.out``:
    ``config.json`` (the resolved configuration), ``metrics.jsonl`` (one line per epoch),
    ``last.pth`` and ``best.pth`` (best validation top-1), ``results.json``, and TensorBoard
    logs when ``tensorboard`` is installed. Returns the summary in ``results.json``."""
    with process_group(config.device):
        return _Run(config, resume).run()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")
