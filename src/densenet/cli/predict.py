"""``densenet predict``: top-k labels of image files and folders, printed; with ``--out``, of
every image of a folder, manifest or glob, written as resumable Parquet shards."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from densenet.cli.common import (
    add_bulk_args,
    add_inference_args,
    add_model_args,
    add_tta_arg,
    check_calibration_images,
    integer,
    model_options,
    output_folder,
    print_json,
    print_problem,
    run_bulk,
    warn_if_random,
)
from densenet.errors import DenseNetError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images: top-k labels with probabilities",
        description="Classify images. --model also takes an exported .onnx file, run with ONNX "
        "Runtime (class names and preprocessing from the file). With --out, the top-k of every "
        "image of one INPUT (a folder, a .txt/.csv/.parquet manifest or a quoted glob) are "
        "written as Parquet shards instead (as `densenet embed` writes embeddings).",
    )
    p.add_argument(
        "images",
        nargs="+",
        help="image files or folders of images (one with --out); a volume model's: volume files "
        "(.nii, .nii.gz, .npy) or folders of them",
    )
    add_model_args(p)
    p.add_argument("--topk", type=integer(), default=5, help="labels per image")
    add_inference_args(p, batch_size=16)
    add_tta_arg(p)
    p.add_argument(
        "--cam",
        metavar="OUT_DIR",
        help="also write OUT_DIR/<image>.cam.png: the top class's activation map over the image "
        "(a volume's: OUT_DIR/<volume>.cam.nii.gz, aligned with it, and its three central "
        "slices as the .cam.png); a name already taken gets -2, -3, ...; OUT_DIR must be "
        "outside the input folders",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    add_bulk_args(p, out_required=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from densenet.tasks.predict import Classifier, write_overlays

    check_calibration_images(args)
    warn_if_random(args)
    if args.out is not None:
        return _run_bulk(args)
    missing = [path for path in args.images if not os.path.exists(path)]
    if missing:  # before any model is loaded or downloaded
        raise FileNotFoundError(f"{', '.join(missing)}: no such file or folder")
    if args.cam:
        output_folder(args.cam, "--cam")
        _check_outside_inputs(args.cam, args.images)
    options = {"batch_size": args.batch_size, "optimize": not args.no_optimize, "tta": args.tta}
    classifier = Classifier(args.model, args.weights, args.device, **options, **model_options(args))
    predictions = classifier.classify(_inputs(args, classifier), topk=args.topk)
    cams: dict[str, dict[str, str]] = {}
    if args.cam:
        good = [p.source for p in predictions if p.error is None]
        written = write_overlays(classifier.explain(good), args.cam)
        cams = {s: {k: str(path) for k, path in w.items()} for s, w in zip(good, written)}
    if args.json:
        print_json([{**p.to_dict(), **cams.get(p.source, {})} for p in predictions])
    else:
        _print(args, predictions, cams)
    return 1 if any(p.error is not None for p in predictions) else 0


def _run_bulk(args: argparse.Namespace) -> int:
    """``--out``: the top-k of every image of the one INPUT, as Parquet shards."""
    from densenet.tasks.bulk import BulkError

    for flag in ("cam", "tta"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} is for listed images; it does not combine with --out")
    if len(args.images) != 1:
        raise BulkError(
            f"--out takes one INPUT (a folder, a manifest or a quoted glob), got {len(args.images)}"
        )
    return run_bulk(args, args.images[0], "predict", topk=args.topk)


def _inputs(args: argparse.Namespace, classifier) -> list[str]:
    """The files of ``args.images`` that the model takes (images, or a volume model's volumes);
    a warning for the other kind's files skipped in the folders, an error if none is left."""
    from densenet.data.images import find_images, is_image_file
    from densenet.data.volumes import is_volume_file

    volumes = classifier.card.volume is not None
    keep, other = (is_volume_file, is_image_file) if volumes else (is_image_file, is_volume_file)
    kind, other_kind = ("volumes", "image") if volumes else ("images", "volume")
    paths = find_images(args.images, keep)
    folders = [path for path in args.images if os.path.isdir(path)]
    skipped = len(find_images(folders, other))
    if skipped:
        where = " ".join(folders)
        message = f"skipped {skipped} {other_kind} file(s) in {where}: this model takes {kind}"
        print_problem(args, "warning", message)
    if not paths:
        raise ValueError(f"no {kind} found in {' '.join(args.images)}")
    return paths


def _print(args: argparse.Namespace, predictions, cams: dict[str, dict[str, str]]) -> None:
    """Each prediction's top-k (and positive labels, and written maps), or its error."""
    for p in predictions:
        if p.error is not None:
            print_problem(args, "error", p.error)
            continue
        print(p.source)
        for label, probability in p.top:
            print(f"  {probability:7.2%}  {label}")
        if p.positive is not None:
            print(f"  above threshold: {', '.join(p.positive) or '(none)'}")
        for key, path in cams.get(p.source, {}).items():
            print(f"  {_CAM_NAMES[key]}: {path}")


def _check_outside_inputs(cam: str, inputs: list[str]) -> None:
    """Refuse a ``--cam`` folder that is an input folder or inside one, or a given file's own
    folder, symbolic links resolved: its maps would be read as inputs by later runs."""
    target = Path(cam).resolve()
    for path in map(Path, inputs):
        if path.is_dir() and path.resolve() in (target, *target.parents):
            where = f"inside the input folder {path}"
        elif not path.is_dir() and path.parent.resolve() == target:
            where = f"the folder of the input {path}"
        else:
            continue
        raise DenseNetError(
            f"--cam {cam} is {where}, where its maps would be read as inputs by later runs; give "
            "a folder outside the inputs"
        )


_CAM_NAMES = {"cam": "class activation map", "cam_slices": "its central slices"}
