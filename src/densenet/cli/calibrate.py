"""``densenet calibrate``: fit temperature or Platt scaling and per-label thresholds on labelled
validation images, and write a calibrated copy of the model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from densenet.cli.common import add_data_args, add_device_arg, integer, print_json, weights_value
from densenet.data.files import text_table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate a model's probabilities and choose per-label thresholds",
        description="Fit the calibration of a model's probabilities on labelled validation "
        "images (one temperature for a single-label model; per label a temperature or Platt "
        "scaling for a multi-label one), optionally choose each label's threshold by a rule, "
        "report the expected calibration error, Brier score and negative log-likelihood before "
        "and after, draw a reliability diagram, and write a calibrated copy of the model (a "
        "training checkpoint whose card predict, eval, bulk predict, Ray and serve apply). Fit "
        "on validation images only, never on the images you report results on.",
    )
    p.add_argument("model", help="a checkpoint of `densenet train`, a weights file, or a name")
    p.add_argument(
        "data",
        help="a folder with one sub-folder per class (or with val/), or for a multi-label model "
        "the folder the --labels CSV's files are relative to",
    )
    p.add_argument("--labels", metavar="CSV", help="multi-label models: the images and labels")
    p.add_argument("--split", help="with --labels: the rows of this split (default val)")
    p.add_argument(
        "--threshold",
        metavar="RULE",
        help="multi-label models: choose each label's threshold by f1, youden, sensitivity=S "
        "(the highest threshold keeping sensitivity >= S) or precision=P (the lowest one with "
        "precision >= P), S and P below 1 and met with 95%% confidence; default keep the model's",
    )
    p.add_argument(
        "--weights",
        type=weights_value,
        default="DEFAULT",
        help="with a named architecture: its weights (DEFAULT, a file)",
    )
    p.add_argument("--out", help="the calibrated model (default MODEL.calibrated.pth beside it)")
    p.add_argument("--diagram", help="the reliability diagram, PNG (default beside --out)")
    p.add_argument("--batch-size", type=integer(), default=64, help="images per batch")
    p.add_argument("--workers", type=integer(0, 64), default=4, help="data loading processes")
    add_device_arg(p)
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from densenet.tasks.evaluate import calibrate_dataset

    named = not args.model.endswith((".pth", ".pt", ".safetensors"))
    report = calibrate_dataset(
        args.data,
        args.model if named else None,
        args.weights if named else args.model,
        out=args.out,
        threshold=args.threshold,
        labels=args.labels,
        split=args.split,
        diagram=args.diagram,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        data_root=args.data_root,
        download=not args.no_download,
        progress=not args.no_progress,
    )
    for warning in report["warnings"]:
        print(f"densenet calibrate: warning: {warning}", file=sys.stderr)
    if args.json:
        print_json(report)
        return 0
    before, after = report["before"], report["after"]
    rows = [["", "ECE", "Brier", "NLL"]]
    for name, metrics in (("before", before), ("after", after)):
        rows.append([name, *(f"{metrics[k]:.4f}" for k in ("ece", "brier", "nll"))])
    print(f"calibrated on {report['images']} images of {report['data']}")
    print(text_table(rows))
    if "labels" in after:
        print(_label_table(report))
    else:
        print(f"temperature {report['temperatures'][0]:.4f}")
    print(f"wrote {report['out']} and {report['diagram']}")
    return 0


def _label_table(report: dict[str, Any]) -> str:
    """Per label of a multi-label model: its temperature, bias, calibration error before and
    after, and threshold (``-`` where it has none)."""
    before, after = report["before"]["labels"], report["after"]["labels"]
    rows = [["label", "temperature", "bias", "ECE before", "ECE after", "threshold"]]
    for i, name in enumerate(after):
        bias = f"{report['bias'][i]:+.3f}" if report["bias"] else "-"
        threshold = report["thresholds"][name] if report["thresholds"] else None
        ece = [f"{before[name]['ece']:.4f}", f"{after[name]['ece']:.4f}"]
        decides = f"{threshold:.4f}" if threshold is not None else "-"
        rows.append([name, f"{report['temperatures'][i]:.3f}", bias, *ece, decides])
    return text_table(rows)
