"""The checkpoints of a training run: ``last.pth`` (and ``best.pth``) written atomically with
every state a bit-exact resume needs, including each process's random-number states, and the
resume that checks the checkpoint belongs to this run."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from densenet.data.files import settings_differences, temporary_of
from densenet.train.config import RUN_OPTIONS
from densenet.weights import checkpoint as checkpoints
from densenet.weights.checkpoint import CheckpointError, TrainCheckpoint

log = logging.getLogger(__name__)


class Checkpointer:
    """Writes and reads the checkpoints in ``out``; only the main process writes, every process
    takes part in gathering the random states (``ddp``)."""

    def __init__(self, out: Path, main: bool, ddp: bool, world_size: int, rank: int) -> None:
        self.last_path, self.best_path = out / "last.pth", out / "best.pth"
        self.out, self.main, self.ddp = out, main, ddp
        self.world_size, self.rank = world_size, rank

    def save(self, checkpoint: TrainCheckpoint, best: bool = False) -> None:
        """Save ``checkpoint`` (its ``rng`` filled here) as ``last.pth``, and ``best.pth`` first
        when ``best``: a kill between the two writes redoes this epoch."""
        checkpoint.rng = self._gather_rng()
        if self.main:
            if best:
                checkpoints.save_checkpoint(checkpoint, self.best_path)
            checkpoints.save_checkpoint(checkpoint, self.last_path)

    def resume(self, config: dict[str, Any], classes: list[str]) -> TrainCheckpoint:
        """``last.pth``, after checking that it was written by a run with this ``config`` (run
        options aside) on data with these ``classes``."""
        checkpoint = checkpoints.read_checkpoint(self.last_path)
        saved = checkpoint.config
        differences = settings_differences(saved, config, ignore=RUN_OPTIONS)
        if list(checkpoint.card.classes) != classes:
            differences.append(
                f"classes: {list(checkpoint.card.classes[:5])} there, {classes[:5]} now"
            )
        if differences:
            raise CheckpointError(
                f"{self.last_path} belongs to another run ({'; '.join(differences[:4])}); "
                "resume with that run's settings or choose another --out"
            )
        if self.main:  # temporary files of writes a kill interrupted
            for stale in self.out.iterdir():
                if temporary_of(stale.name):
                    stale.unlink(missing_ok=True)
        log.info(
            "resuming %s at epoch %d, step %d",
            self.last_path,
            checkpoint.epoch + 1,
            checkpoint.step,
        )
        return checkpoint

    def restore_rng(self, checkpoint: TrainCheckpoint) -> None:
        """This process's random states from ``checkpoint`` (rank 0's if the process count
        changed)."""
        ranks = checkpoint.rng
        _set_rng_state(ranks[self.rank] if len(ranks) == self.world_size else ranks[0])

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = _rng_state()
        if not self.ddp:
            return [state]
        import torch.distributed as dist

        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, state)
        return ranks


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
