"""The metrics log of a training run: one JSON line per epoch in ``metrics.jsonl`` (cut back to
the resumed checkpoint's epoch on resume) and, when ``tensorboard`` is installed, TensorBoard
scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from densenet.data.files import write_text


class MetricsLog:
    """Appends epoch records to ``out/metrics.jsonl`` and ``out/tensorboard``."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.jsonl"
        self.writer = _tensorboard(out / "tensorboard")

    def truncate(self, epoch: int) -> None:
        """Drop the records of epochs after ``epoch`` (done after the checkpoint resumed from)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] <= epoch:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line a kill cut short
                continue
        write_text(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        """Log one epoch's ``record`` (with its ``epoch``)."""
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
