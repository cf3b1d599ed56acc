"""``densenet export``: ONNX, TorchScript, a ``torch.export`` program or an OpenVINO IR, and a
Triton repository."""

from __future__ import annotations

import argparse
import os
import tempfile

from densenet.choices import EXPORT_FORMATS
from densenet.cli.common import (
    MAX_IMAGE_SIZE,
    add_calibration_images_arg,
    add_model_args,
    check_calibration_images,
    integer,
    print_report,
    warn_if_random,
)
from densenet.data.files import check_not_input, check_regular_file


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as ONNX, TorchScript, a torch.export program (.pt2) or an OpenVINO IR",
        description="Export for deployment. Input (N, 3, H, W) normalised images, output "
        "(N, classes) logits; class names and preprocessing are stored in the file. Batch, height "
        "and width are dynamic unless --batch-size / --image-size fix them (TorchScript always "
        "takes any; there they set the tracing example). `--weights none` exports random weights.",
    )
    add_model_args(p)
    p.add_argument("--format", required=True, choices=list(EXPORT_FORMATS))
    p.add_argument(
        "--out",
        help="output file (.onnx, .pt, .pt2), or folder (openvino: model.xml, model.bin); "
        "optional with --triton-repo",
    )
    batch = p.add_mutually_exclusive_group()
    batch.add_argument(
        "--batch-size", type=integer(1, 4096), help="fix the batch size (default: dynamic)"
    )
    batch.add_argument(
        "--dynamic-batch",
        dest="batch_size",
        action="store_const",
        const=None,
        help="dynamic batch axis (the default)",
    )
    p.add_argument(
        "--image-size",
        type=integer(1, MAX_IMAGE_SIZE),
        help="fix height and width (default: any size)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16", "int8"],
        help="precision (int8: --format onnx, a QDQ model calibrated on --calibration-images; "
        "openvino: float32, or float16 weights)",
    )
    add_calibration_images_arg(
        p, "with --dtype int8: a folder of a few hundred of your images to calibrate on"
    )
    p.add_argument("--fold", action="store_true", help="the inference form (BatchNorm folded)")
    p.add_argument("--opset", type=integer(), help="ONNX operator set, 18 or newer (default 18)")
    p.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository")
    p.add_argument("--triton-max-batch", type=integer(), help="Triton max_batch_size (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from densenet.infer.load import load
    from densenet.infer.openvino import IR_FILES
    from densenet.nn.network import Network
    from densenet.tasks.export import (
        DEFAULT_OPSET,
        ExportError,
        check_ir_folder,
        export,
        write_triton_repo,
    )

    onnx_only = {
        "--opset": args.opset is not None,
        "--triton-repo": args.triton_repo is not None,
        "--dtype int8": args.dtype == "int8",
    }
    for flag, given in onnx_only.items():
        if given and args.format != "onnx":
            raise ValueError(f"{flag} applies to --format onnx only")
    if args.triton_max_batch is not None and args.triton_repo is None:
        raise ValueError("--triton-max-batch applies with --triton-repo DIR only")
    if args.out is None and args.triton_repo is None:
        raise ValueError("give the output file with --out FILE")
    check_calibration_images(args)
    if args.out is not None:  # before the model is loaded and exported
        check_not_input(args.out, "--out", (args.model, args.weights, args.calibration_images))
        (check_ir_folder if args.format == "openvino" else check_regular_file)(args.out)
    options = {"batch_size": args.batch_size, "image_size": args.image_size}
    options.update(dtype=args.dtype, fold=args.fold)
    if args.format == "onnx":
        options["opset"] = DEFAULT_OPSET if args.opset is None else args.opset
        options["calibration_images"] = args.calibration_images
    warn_if_random(args)
    loaded = load(args.model, weights=args.weights)
    if not isinstance(loaded.module, Network):
        raise ExportError(
            f"{args.model} is an exported file ({type(loaded.module).__name__}); export takes an "
            "architecture with weights, a weights file or a checkpoint of densenet train"
        )
    name = loaded.card.arch or args.model
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, "model.onnx")
        path = export(loaded.module, out, args.format, card=loaded.card, **options)
        report = {"format": args.format, "model": name, "weights": args.weights, **options}
        files = [path / file for file in IR_FILES] if path.is_dir() else [path]
        report["size_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 3)
        if args.out is not None:
            report["path"] = str(path)
        if args.triton_repo is not None:
            max_batch = 64 if args.triton_max_batch is None else args.triton_max_batch
            folder = write_triton_repo(path, args.triton_repo, name, max_batch)
            report["triton_model"] = str(folder)
    print_report(report, args.json)
    return 0
