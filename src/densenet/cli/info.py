"""``densenet info``: parameters, GFLOPs, published weights and their accuracy."""

from __future__ import annotations

import argparse

from ..io import text_table
from ..registry import list_models, model_info
from ..weights import WEIGHTS
from .common import print_json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="the models: parameters, GFLOPs, weights, accuracy",
        description="List the architectures (or those named): parameters, GFLOPs at 224x224, "
        "input size, classes, and the published weights with their ImageNet top-1/top-5.",
    )
    p.add_argument("models", nargs="*", help="architectures (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in args.models or list_models():
        info = model_info(name)
        entries = {w.name: w for w in WEIGHTS.get(name, {}).values()}
        info["weights"] = [w.meta() for w in entries.values()]
        rows.append(info)
    if args.json:
        print_json(rows)
        return 0
    lines = [["model", "params", "GFLOPs", "input", "classes", "weights", "acc@1", "acc@5"]]
    for info in rows:
        w = info["weights"][0] if info["weights"] else None
        lines.append([
            info["name"], f"{info['params'] / 1e6:.2f}M", f"{info['gflops']:.2f}",
            str(info["input_size"]), str(info["num_classes"]), w["name"] if w else "-",
            f"{w['acc1']:.3f}" if w else "-", f"{w['acc5']:.3f}" if w else "-",
        ])  # fmt: skip
    print(text_table(lines))
    return 0
