"""Bulk inference: the embeddings (pooled features) or top-k predictions of many images, written
as Parquet shards of a fixed number of rows, resumable after a kill, split over torchrun ranks.

The input (a folder, a manifest of paths, or a glob) is listed lazily in a deterministic order,
so shard k holds the same images in every run and in every process. A shard is written to a
temporary name, flushed to disk and renamed, so a shard file on disk is complete: a rerun skips
the shards that exist, and under ``torchrun`` rank r writes the shards with k % world_size == r,
the output folder being the only coordination. Every input gets a row; an unreadable image gets
its error and a null vector.

Modules, from the top: ``job`` (the run: placement, the plan, the loop writing this process's
shards), ``outputs`` (the model's columns), ``shards`` (the output folder: its settings, the
Parquet tables, the complete shards), ``decoding`` (images to tensors, on the CPU or the GPU),
``inputs`` (listing the input), ``options`` (what a run computes).
"""

from densenet.tasks.bulk.decoding import Decoder
from densenet.tasks.bulk.inputs import iter_inputs
from densenet.tasks.bulk.job import Summary, run
from densenet.tasks.bulk.options import DTYPES, BulkError, Options
from densenet.tasks.bulk.outputs import Outputs
from densenet.tasks.bulk.shards import to_table

__all__ = [
    "DTYPES",
    "BulkError",
    "Decoder",
    "Options",
    "Outputs",
    "Summary",
    "iter_inputs",
    "run",
    "to_table",
]
