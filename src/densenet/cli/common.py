"""What the command modules share: output formatting and the common arguments."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from densenet.choices import BACKENDS, PRECISIONS, VIEWS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless that is None or off, or the help already
    names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """A command's parser (and its sub-commands'): ``HelpFormatter`` unless told otherwise."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def print_problem(args: argparse.Namespace, kind: str, message: str) -> None:
    """``message`` on stderr after the command's prefix: ``densenet predict: error: ...``, the
    same as argparse's own errors."""
    print(f"densenet {args.command}: {kind}: {message}", file=sys.stderr)


def warn_if_random(args: argparse.Namespace) -> None:
    """Say on stderr that ``--weights none`` gives random weights (a smoke test, not a model)."""
    if args.weights is None:
        print_problem(args, "warning", "--weights none: random weights, the outputs mean nothing")


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def print_report(report: dict | list[dict], as_json: bool) -> None:
    """JSON, or one ``key: value`` line per record (nested values and None left out)."""
    if as_json:
        print_json(report)
        return
    for record in report if isinstance(report, list) else [report]:
        fields = (
            f"{k}: {v}" for k, v in record.items() if v is not None and not isinstance(v, dict)
        )
        print("  ".join(fields))


MAX_IMAGE_SIZE = 4096  # pixels per side of an exported or benchmarked input


def integer(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[minimum, maximum]``; anything else is a usage
    error naming the range (exit status 2), before any work starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({bound})")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float = 0.0) -> Callable[[str], float]:
    """An argparse type: a finite number of at least ``minimum`` (no nan, no inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be a finite number >= {minimum:g}")
        return value

    parse.__name__ = "number"
    return parse


def weights_value(text: str) -> str | None:
    """A ``--weights`` value: ``none`` means random initialisation."""
    return None if text.lower() == "none" else text


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """``--model`` and ``--weights``, as ``densenet.load`` takes them."""
    parser.add_argument(
        "--model",
        default=default_model,
        help="architecture (see `densenet info`) or an exported/checkpoint file "
        f"(default {default_model or 'densenet121, or the checkpoint --weights names'})",
    )
    parser.add_argument(
        "--weights",
        type=weights_value,
        default="DEFAULT",
        help="weights name (DEFAULT, IMAGENET1K_V1), a local .pth/.pt/.safetensors file, "
        "a checkpoint of `densenet train`, or none (random initialisation)",
    )


def accept_negative_lists(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` take a value that starts with a negative number, such as ``--window
    -1000,400``, as a value: argparse takes only a lone negative number (``-1000``) for one and
    reads any other word that starts with ``-`` as an unknown option."""
    parser._negative_number_matcher = re.compile(r"^-\.?\d[\d.,e+-]*$")  # argparse's own hook


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root",
        help="folder of named data sets (default $DENSENET_DATA, ~/.cache/densenet/data)",
    )
    p.add_argument("--no-download", action="store_true", help="never download a named data set")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1..."
    )


def add_calibration_images_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """``--calibration-images DIR`` (and its older spelling ``--calibration``): the images an
    int8 model is calibrated on (``args.calibration_images``)."""
    parser.add_argument(
        "--calibration-images",
        "--calibration",
        dest="calibration_images",
        metavar="DIR",
        help=f"{help} (--calibration: the older spelling)",
    )


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--backend`` and ``--calibration-images``: the optimized model's precision
    and engine."""
    parser.add_argument(
        "--dtype",
        choices=["auto", *PRECISIONS, "int8"],
        help="precision of the optimized model (default: float32 on the CPU, exact; bfloat16 on "
        "CUDA); auto: bfloat16 where the hardware computes it natively (CUDA, CPUs with AVX-512 "
        "BF16 or AMX), else float32; int8: quantized on the CPU, calibrated on "
        "--calibration-images",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="engine of the optimized model (densenet.optimize's backend; default: the fastest "
        "measured for this device, CPU kind and precision: see densenet info --engines)",
    )
    add_calibration_images_arg(
        parser, "with --dtype int8: a folder of a few hundred of your images to calibrate on"
    )


def add_tta_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta",
        choices=list(VIEWS),
        help="test-time augmentation: average the probabilities (after calibration) of the "
        "center crop and its mirror (hflip: 2x the compute), the four corners and the center "
        "(five-crop: 5x) or those and their mirrors (ten-crop: 10x)",
    )


def add_inference_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Where and how a command runs its model: --device, --dtype, --batch-size, --no-optimize."""
    add_device_arg(parser)
    add_dtype_arg(parser)
    parser.add_argument(
        "--batch-size", type=integer(), default=batch_size, help="images per forward pass"
    )
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="run the reference module instead of the fast inference form (densenet.optimize)",
    )


def add_bulk_args(parser: argparse.ArgumentParser, out_required: bool) -> None:
    """The options of a bulk run into Parquet shards (``densenet embed``, ``predict --out``)."""
    parser.add_argument(
        "--out",
        required=out_required,
        help="folder of Parquet shards, written resumably (a rerun skips the complete ones)",
    )
    parser.add_argument(
        "--shard-size", type=integer(), default=10_000, help="rows per Parquet file"
    )
    parser.add_argument(
        "--workers",
        type=integer(0, 64),
        help="decoding processes, 0..64 (default: half the CPUs, at most 8)",
    )
    parser.add_argument(
        "--device-decode", action="store_true", help="decode JPEGs on the GPU (CUDA only)"
    )
    parser.add_argument(
        "--exact-decode",
        action="store_true",
        help="decode every JPEG at full size, as densenet predict does (default: a large one at "
        "a reduced scale, faster and within a few grey levels after the resize)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )


def output_folder(path: str, flag: str) -> None:
    """Check, before any work, that ``path`` is a folder the command can write into or create:
    a file there, or a folder (or nearest existing parent) that is not writable, is one error
    naming ``flag``. Nothing is created."""
    folder = Path(path).absolute()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not a writable folder")


def check_calibration_images(args: argparse.Namespace) -> None:
    """``--calibration-images`` is for ``--dtype int8`` only, ``--backend`` for the optimized
    model's other precisions: a usage error before any work otherwise."""
    if args.calibration_images is not None and args.dtype != "int8":
        raise ValueError(
            "--calibration-images applies with --dtype int8 only; add --dtype int8 or drop it"
        )
    if getattr(args, "backend", None) is None:
        return
    if getattr(args, "no_optimize", False):
        raise ValueError("--backend picks the optimized model's engine; drop it or --no-optimize")
    if args.dtype == "int8":
        raise ValueError("--backend does not apply to --dtype int8 (its own engine); drop one")


def model_options(args: argparse.Namespace) -> dict[str, object]:
    """How ``add_dtype_arg``'s flags ask the model to run: ``dtype``, ``backend`` and
    ``calibration_images``, as ``Classifier`` takes them."""
    return {
        "dtype": args.dtype,
        "backend": args.backend,
        "calibration_images": args.calibration_images,
    }


def run_bulk(args: argparse.Namespace, source: str, task: str, **options) -> int:
    """Run the bulk ``task`` with ``options`` (``densenet.tasks.bulk.Options``), those of
    ``add_bulk_args`` and the model's; print its summary (shards written and skipped, rows, error
    rows, images/s) as JSON."""
    from densenet.tasks import bulk

    output_folder(args.out, "--out")
    shared = {"shard_size": args.shard_size, "exact_decode": args.exact_decode}
    options = bulk.Options(task, calibration_images=args.calibration_images, **shared, **options)
    summary = bulk.run(
        source,
        args.out,
        options,
        args.model,
        args.weights,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        optimize=not args.no_optimize,
        precision=args.dtype,
        backend=args.backend,
        device_decode=args.device_decode,
        progress=args.progress,
    )
    print_json(summary.to_dict())
    return 0
