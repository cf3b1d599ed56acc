"""The model of a bulk run on preprocessed batches: this task's columns as numpy arrays."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from densenet.infer.load import LoadedModel
from densenet.infer.runner import Runner
from densenet.nn.network import Network
from densenet.tasks.bulk.options import BulkError, Options


class Outputs:
    """The model on preprocessed batches: (N, 3, H, W) on the device -> this task's columns as
    numpy arrays of N rows: ``embedding`` (N, D) for embed; ``indices`` (N, k) int32,
    ``probabilities`` (N, k) float32 and, for a multi-label card, ``scores`` (N, classes) for
    predict.

    optimize: run ``densenet.optimize``'s inference form (for embed, of the model without its
    classifier, whose output is the pooled features); ``precision`` its compute dtype, a name
    that ``densenet.infer.runtime.compute_dtype`` takes (None: float32 on CPU, bfloat16 on CUDA), and
    ``backend`` its engine (``densenet.optimize``'s; None: the fastest measured). False runs the
    eager model in float32. A volume model, or for embed a model that is not a DenseNet or
    RDNet, is a ``BulkError``.
    """

    def __init__(
        self,
        model: LoadedModel,
        options: Options,
        device: torch.device,
        optimize: bool = True,
        precision: str | None = None,
        backend: str | None = None,
    ) -> None:
        self.options, self.device, self.card = options, device, model.card
        self.topk = min(options.topk, model.card.num_classes)
        if model.card.volume is not None:
            raise BulkError(
                "bulk runs read images; a volume model classifies volume files with densenet "
                "predict (without --out) or densenet eval"
            )
        embed = options.task == "embed"
        if embed and not isinstance(model.module, Network):
            raise BulkError(
                f"embeddings come from a DenseNet or RDNet (an architecture, weights or a training "
                f"checkpoint), not a {type(model.module).__name__}; give the model it was "
                "exported from (an exported file classifies: densenet predict --out)"
            )
        self.runner = Runner(
            model,
            device,
            optimize=optimize,
            dtype=precision,
            backend=backend,
            headless=embed,
            calibration_images=options.calibration_images,
            throughput=True,
        )
        if embed:
            self.widths = {"embedding": model.module.num_features}
        else:
            self.widths = {"indices": self.topk, "probabilities": self.topk}
            if self.card.multi_label:
                self.widths["scores"] = model.card.num_classes

    def empty(self) -> dict[str, np.ndarray]:
        """The columns of zero rows (a shard of unreadable images)."""
        dtypes = {"embedding": self.options.vector_dtype, "indices": "int32"}
        return {k: np.zeros((0, w), dtypes.get(k, "float32")) for k, w in self.widths.items()}

    def __call__(self, images: Tensor) -> dict[str, np.ndarray]:
        if self.options.task == "embed":
            out = self.runner.logits(images)
            if self.options.normalize:
                out = F.normalize(out, dim=1)
            return {"embedding": out.to(getattr(torch, self.options.vector_dtype)).cpu().numpy()}
        scores = self.runner.probabilities(images)
        top_p, top_i = scores.topk(self.topk, dim=1)
        columns = {"indices": top_i.int(), "probabilities": top_p}
        if self.card.multi_label:
            columns["scores"] = scores
        return {k: v.cpu().numpy() for k, v in columns.items()}
