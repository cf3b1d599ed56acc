"""``densenet embed``: the pooled features of every image of a folder, manifest or glob, written
as resumable Parquet shards."""

from __future__ import annotations

import argparse

from densenet.choices import VECTOR_DTYPES
from densenet.cli.common import (
    add_bulk_args,
    add_inference_args,
    add_model_args,
    check_calibration_images,
    run_bulk,
    warn_if_random,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embeddings (pooled features) of many images into Parquet shards",
        description="Write every image's pooled features (the classifier's input) as Parquet "
        "files of --shard-size rows; an unreadable image gets a row with its error. Rerun the "
        "same command to resume; under torchrun each process writes its share of the shards.",
    )
    p.add_argument("input", help="a folder, a .txt/.csv/.parquet manifest, or a quoted glob")
    add_model_args(p)
    add_inference_args(p, batch_size=64)
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument(
        "--vector-dtype",
        choices=VECTOR_DTYPES,
        default="float32",
        help="the stored vectors' type (the Parquet column's); --dtype is the model's precision",
    )
    add_bulk_args(p, out_required=True)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_calibration_images(args)
    warn_if_random(args)
    vectors = {"normalize": args.normalize, "vector_dtype": args.vector_dtype}
    return run_bulk(args, args.input, "embed", **vectors)
