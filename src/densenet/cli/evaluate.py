"""``densenet eval``: top-1/top-5 error on a folder or a named data set."""

from __future__ import annotations

import argparse
import sys

from densenet.cli.common import (
    add_data_args,
    add_device_arg,
    add_dtype_arg,
    add_model_args,
    add_tta_arg,
    check_calibration_images,
    integer,
    model_options,
    print_json,
    warn_if_random,
)
from densenet.data.files import text_table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 error on an ImageNet-style folder or a named data set",
        description="Evaluate a model: top-1 and top-5 error (%) and images/s (end to end, "
        "decoding included). Single-crop uses the weights' own transform; --ten-crop the "
        "paper's. Under torchrun the data is sharded over the processes.",
    )
    p.add_argument(
        "data",
        help="a folder with one sub-folder per class (or with train/ and val/: val/ is used), "
        "or cifar10, cifar100, svhn (their test sets)",
    )
    add_model_args(p)
    p.add_argument("--batch-size", type=integer(), default=64, help="images per batch")
    p.add_argument("--workers", type=integer(0, 64), default=4, help="data loading processes")
    views = p.add_mutually_exclusive_group()  # one set of views: never one silently dropped
    views.add_argument(
        "--ten-crop", action="store_true", help="the paper's ten crops: --tta ten-crop"
    )
    add_tta_arg(views)
    add_device_arg(p)
    add_dtype_arg(p)
    p.add_argument(
        "--no-optimize", action="store_true", help="run the eager model, not densenet.optimize"
    )
    p.add_argument(
        "--labels",
        metavar="CSV",
        help="multi-label models: the images (relative to DATA) and their labels",
    )
    p.add_argument("--split", help="with --labels: the rows of this split (default val)")
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from densenet.infer.runtime import torchrun_ranks
    from densenet.tasks.evaluate import evaluate_dataset

    check_calibration_images(args)
    warn_if_random(args)
    result = evaluate_dataset(
        args.data,
        args.model,
        args.weights,
        ten_crop=args.ten_crop,
        tta=args.tta,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        data_root=args.data_root,
        download=not args.no_download,
        progress=not args.no_progress,
        optimize=not args.no_optimize,
        labels=args.labels,
        split=args.split,
        **model_options(args),
    )
    if torchrun_ranks().rank != 0:
        return 0
    if args.json:
        print_json(result)
        return 0
    if "mean_auroc" in result:
        _print_labels(result)
        return 0
    print(
        f"{result['model']} on {result['data']} ({result['images']} images, "
        f"{result['crops']} crop{'s' if result['crops'] > 1 else ''}): "
        f"top-1 error {result['top1_error']:.3f}%  top-5 error {result['top5_error']:.3f}%  "
        f"ECE {result['ece']:.4f}  {result['images_per_second']:.1f} images/s"
    )
    if result["skipped"]:
        print(f"skipped {result['skipped']} unreadable images", file=sys.stderr)
    return 0


def _print_labels(result: dict) -> None:
    """The per-label table of a multi-label evaluation; the decisions at each label's
    threshold (sensitivity, specificity) beside the threshold-free AUROC and AP."""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = [["label", "AUROC", "AP", "ECE", "threshold", "sens.", "spec.", "positives"]]
    for name, row in result["labels"].items():
        rows.append(
            [
                name,
                rate(row["auroc"]),
                rate(row["ap"]),
                f"{row['ece']:.4f}",
                f"{row['threshold']:.4f}",
                rate(row["sensitivity"]),
                rate(row["specificity"]),
                str(row["positives"]),
            ]
        )
    means = (result["mean_auroc"], result["mean_ap"], result["ece"])
    rows.append(["mean", *map(rate, means), "", "", "", ""])
    print(f"{result['model']} on {result['data']} ({result['images']} images)")
    print(text_table(rows))
    if result["undefined"]:
        print(
            f"densenet eval: warning: label(s) {', '.join(result['undefined'])} have one class "
            "only in these images: no AUROC or AP, left out of the means",
            file=sys.stderr,
        )
    if result["skipped"]:
        print(f"skipped {result['skipped']} unreadable images", file=sys.stderr)
