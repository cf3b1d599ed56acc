"""Training checkpoints: one versioned ``TrainCheckpoint`` (the model card, the weights, and the
optimizer, scheduler, scaler, progress and random-number states a resume needs), written
atomically and read once, recognised by its ``format`` field."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from densenet.data.card import ModelCard, Preprocessing
from densenet.data.files import atomic_write, read_torch_file
from densenet.errors import DenseNetError, first_line

__all__ = [
    "FORMAT",
    "CheckpointError",
    "TrainCheckpoint",
    "is_train_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

FORMAT = "densenet-train-2"
_V1 = "densenet-train-1"  # arch, classes and transform as separate keys; read, never written


class CheckpointError(DenseNetError, RuntimeError):
    """A checkpoint that cannot be written or read."""


@dataclass
class TrainCheckpoint:
    """Everything ``densenet train`` saves. ``card.arch`` and ``model_args`` rebuild the network
    (``get_model(card.arch, **model_args)``), ``model`` is its state_dict."""

    card: ModelCard
    model: dict[str, Tensor]
    model_args: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the run's TrainConfig, JSON-ready
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    best_acc1: float = -1.0
    best_epoch: int = 0
    # loss sum, correct, images, skipped
    meter: list[float] = field(default_factory=lambda: [0.0] * 4)
    rng: list[dict[str, Any]] = field(default_factory=list)  # one random state per process

    def to_state(self) -> dict[str, Any]:
        """What the file holds: plain containers and tensors (``torch.load(weights_only=True)``)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"format": FORMAT, **state, "card": self.card.to_dict()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], path: str | os.PathLike) -> TrainCheckpoint:
        """The checkpoint in a file's content; ``CheckpointError`` when it is not one."""
        version = state.get("format")
        if version not in (FORMAT, _V1):
            raise CheckpointError(
                f"{path} is not a densenet training checkpoint "
                f"(format {version!r}, expected {FORMAT!r})"
            )
        values = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        if version == _V1:
            t = state["transform"]
            pre = Preprocessing(
                t["resize_size"], t["crop_size"], mean=tuple(t["mean"]), std=tuple(t["std"])
            )
            values["card"] = ModelCard(tuple(state["classes"]), pre, arch=state["arch"])
        else:
            values["card"] = ModelCard.from_dict(state["card"])
        return cls(**values)


def is_train_checkpoint(state: Any) -> bool:
    """Whether a file's content is a training checkpoint (by its ``format`` field)."""
    return isinstance(state, Mapping) and state.get("format") in (FORMAT, _V1)


def read_checkpoint(path: str | os.PathLike) -> TrainCheckpoint:
    """The training checkpoint in ``path`` (read without executing code, on the CPU)."""
    state = read_torch_file(path, "checkpoint", CheckpointError)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return TrainCheckpoint.from_state(state, path)


def save_checkpoint(checkpoint: TrainCheckpoint, path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically. On failure (a full disk...) ``path`` keeps its
    previous content and ``CheckpointError`` says what happened."""
    state = checkpoint.to_state()
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or first_line(error)
        kept = (
            "the previous checkpoint there is intact"
            if os.path.exists(path)
            else "nothing was written"
        )
        raise CheckpointError(
            f"cannot write checkpoint {path} ({reason}); {kept}. Free disk space and continue "
            "with --resume"
        ) from None
