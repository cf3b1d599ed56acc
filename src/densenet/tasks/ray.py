"""Ray Data integration: callable classes for ``Dataset.map_batches`` that add a DenseNet's
embeddings (``Embedder``) or top-k predictions (``Predictor``) to every row, with the same
preprocessing, columns and per-image errors as ``densenet.tasks.bulk``'s Parquet shards.

Each actor loads the model once (on its GPU when Ray gives it one). A batch is a dict of numpy
arrays or a ``pyarrow.Table`` with the encoded images in a ``bytes`` column
(``ray.data.read_binary_files``) or their files in a ``path`` column; the result is a
``pyarrow.Table`` with the batch's other columns plus ``error`` and the outputs. Needs the ``ray``
extra: ``pip install "densenet-toolkit[ray]"``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from densenet.deprecation import renamed_keywords
from densenet.infer.load import load
from densenet.infer.runtime import resolve_device
from densenet.tasks.bulk import Decoder, Options, Outputs, to_table
from densenet.weights.published import WeightsArg

__all__ = ["Embedder", "Predictor"]

INPUT_COLUMNS = ("bytes", "path")  # where the images are, in order of preference


class _MapBatches:
    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        weights: WeightsArg,
        options: Options,
        device: str,
        optimize: bool,
        precision: str,
    ) -> None:
        target = resolve_device(device)
        loaded = load(model, weights=weights, device=target, progress=False)
        self.card = loaded.card
        self.decode = Decoder(self.card.preprocessing, options.exact_decode)
        self.outputs = Outputs(loaded, options, target, optimize, precision)

    def __call__(self, batch: Any):
        """A batch (dict of arrays or ``pyarrow.Table``) -> ``pyarrow.Table`` of its rows with
        ``error`` and this task's columns; the ``bytes`` column is dropped."""
        import pyarrow as pa

        columns = batch.to_pydict() if hasattr(batch, "to_pydict") else dict(batch)
        key = next((k for k in INPUT_COLUMNS if k in columns), None)
        if key is None:
            raise KeyError(f"a batch needs a 'bytes' or 'path' column, got {list(columns)}")
        sources = [bytes(s) if key == "bytes" else str(s) for s in columns[key]]
        decoded = [self.decode(source) for source in sources]
        errors = [error for _, error in decoded]
        images = [image for image, _ in decoded if image is not None]
        outputs = self.outputs.empty()
        if images:
            outputs = self.outputs(torch.stack(images).to(self.outputs.device))
        table = to_table(None, errors, outputs, self.card.classes)
        for name, values in columns.items():
            if name not in ("bytes", "error") and name not in table.column_names:
                table = table.append_column(name, pa.array(list(values)))
        return table


@renamed_keywords(dtype="vector_dtype")
class Embedder(_MapBatches):
    """``ds.map_batches(Embedder, fn_constructor_kwargs={...}, concurrency=n)``: adds
    ``embedding`` (the pooled features, (D,) per row, null for an unreadable image) and
    ``error``.

    Args:
        model, weights: what ``densenet.load`` takes (as ``densenet embed --model``/``--weights``:
            an architecture name and a weights name, a local file or a training checkpoint, or
            None; or a ``DenseNet``).
        normalize: L2-normalise each vector.
        vector_dtype: the stored vectors' type, ``"float32"`` or ``"float16"`` (``dtype=``:
            the deprecated spelling); ``precision`` is the model's compute dtype.
        device: ``"auto"`` (the GPU Ray assigned, if any), ``"cpu"`` or ``"cuda"``.
        optimize, precision: as for ``densenet.tasks.bulk.Outputs``.
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module | None = None,
        weights: WeightsArg = "DEFAULT",
        *,
        normalize: bool = False,
        vector_dtype: str = "float32",
        device: str = "auto",
        optimize: bool = True,
        precision: str | None = None,
    ) -> None:
        options = Options(task="embed", normalize=normalize, vector_dtype=vector_dtype)
        super().__init__(model, weights, options, device, optimize, precision)


class Predictor(_MapBatches):
    """``ds.map_batches(Predictor, fn_constructor_kwargs={...}, concurrency=n)``: adds
    ``labels``, ``indices`` and ``probabilities`` (the top-k, most probable first), for a
    multi-label model card sigmoid probabilities and every label's in ``scores``; and ``error``.
    Other arguments as ``Embedder``'s."""

    def __init__(
        self,
        model: str | os.PathLike | nn.Module | None = None,
        weights: WeightsArg = "DEFAULT",
        *,
        topk: int = 5,
        device: str = "auto",
        optimize: bool = True,
        precision: str | None = None,
    ) -> None:
        options = Options(task="predict", topk=topk)
        super().__init__(model, weights, options, device, optimize, precision)
