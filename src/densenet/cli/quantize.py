"""``densenet quantize``: post-training static int8 quantization calibrated on a folder of images,
with a report of what was lost against float32."""

from __future__ import annotations

import argparse
from pathlib import Path

from densenet.cli.common import integer, print_json, print_problem, warn_if_random, weights_value
from densenet.data.files import check_output_file, text_table
from densenet.errors import DenseNetError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="int8 quantization of a model for the CPU, calibrated on your images",
        description="Quantize a model to int8 (per-channel weights, activations calibrated on "
        "the images of CALIBRATION_IMAGES), report the top-1 agreement and relative logit error "
        "against float32 on held-out images (and with --validation the accuracy before and "
        "after), and write a file with the card that densenet.load reads: an OpenVINO IR folder "
        "quantized by NNCF when openvino and nncf are installed, else a TorchScript file of "
        "PyTorch's deprecated FX int8. Image models only.",
    )
    p.add_argument(
        "model",
        help="a checkpoint of `densenet train`, a weights file, or a name (a float model, not "
        "an exported file)",
    )
    p.add_argument(
        "calibration_images",
        metavar="CALIBRATION_IMAGES",
        help="a folder of images to calibrate on (searched recursively)",
    )
    p.add_argument(
        "--weights",
        type=weights_value,
        default="DEFAULT",
        help="with a named architecture: its weights (none: random)",
    )
    p.add_argument("--images", type=integer(), default=300, help="calibration images to read")
    p.add_argument("--holdout", type=integer(0), default=50, help="of those, kept for the report")
    p.add_argument("--validation", metavar="DIR", help="a folder with one sub-folder per class")
    p.add_argument(
        "--out",
        help="the int8 model: a folder for NNCF's IR (default MODEL.int8/ beside it), a file "
        "for FX's TorchScript (default MODEL.int8.pt)",
    )
    p.add_argument("--batch-size", type=integer(), default=16, help="images per batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from densenet.infer.openvino import IR_FILES
    from densenet.infer.quantization import default_engine, quantize, save_quantized

    stem = str(Path(args.model).with_suffix(""))
    inputs = (args.model, args.calibration_images, args.validation)
    if default_engine() == "nncf":  # a folder: its two files, or the new folder, checked
        out = args.out or stem + ".int8"
        folder = Path(out)
        for target in [folder / name for name in IR_FILES] if folder.is_dir() else [folder]:
            check_output_file(target, "--out", inputs)  # before the work
        if folder.is_file():
            raise DenseNetError(f"--out {out} is a file; NNCF's int8 model is a folder: give one")
    else:
        out = args.out or stem + ".int8.pt"
        check_output_file(out, "--out", inputs)  # before the work, not after it
    warn_if_random(args)
    result = quantize(
        args.model,
        args.calibration_images,
        weights=args.weights,
        num_images=args.images,
        holdout=args.holdout,
        validation=args.validation,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    save_quantized(result, out)
    report = {**result.report, "out": out}
    if not report["held_out"]:
        why = f"that needs more than --holdout {args.holdout}" if args.holdout else "--holdout 0"
        print_problem(
            args,
            "warning",
            f"none of the {report['images']} images was held out ({why}): int8 "
            "is compared with float32 on the images it was calibrated on, which flatters it; "
            "give more images or a smaller --holdout",
        )
    if args.json:
        print_json(report)
        return 0
    compared = "held out" if report["held_out"] else "calibration (none held out)"
    agreement, error = report["top1_agreement"], report["relative_logit_error"]
    rows = [["images", "compared on", "top-1 agreement", "relative logit error"]]
    rows.append([str(report["images"]), compared, f"{agreement:.4f}", f"{error:.4f}"])
    print(text_table(rows))
    if "validation" in report:
        v = report["validation"]
        print(f"accuracy float32 {v['accuracy_float32']:.4f}  int8 {v['accuracy_int8']:.4f}")
    print(f"wrote {out}")
    return 0
