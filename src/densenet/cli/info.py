"""``densenet info``: parameters, GFLOPs, published weights and their accuracy, from the tables
of configurations and weights (no model is built, torch is not imported); with ``--engines``,
the engine each precision runs on this machine by default, and why."""

from __future__ import annotations

import argparse
from typing import Any

from densenet.architectures import list_models, model_info
from densenet.cli.common import print_json
from densenet.data.files import text_table
from densenet.weights.published import WEIGHTS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "info",
        help="the models: parameters, GFLOPs, weights, accuracy",
        description="List the architectures (or those named): parameters, GFLOPs at 224x224, "
        "input size, classes, and the published weights with their ImageNet top-1/top-5.",
    )
    p.add_argument("models", nargs="*", help="architectures (default: all)")
    p.add_argument(
        "--engines",
        action="store_true",
        help="instead: this machine's CPU (name, kind, flags) and CUDA device, and the engine "
        "densenet.optimize runs by default in each precision, with the measurement behind it",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.engines:
        return _engines(args)
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
    lines += [_line(info) for info in rows]
    print(text_table(lines))
    return 0


def _line(info: dict[str, Any]) -> list[str]:
    """A line of the table: the architecture, and its first published weights with their
    accuracy (``-`` where it has none)."""
    model = [
        info["name"],
        f"{info['params'] / 1e6:.2f}M",
        f"{info['gflops']:.2f}",
        str(info["input_size"]),
        str(info["num_classes"]),
    ]
    if not info["weights"]:
        return [*model, "-", "-", "-"]
    w = info["weights"][0]
    acc5 = f"{w['acc5']:.3f}" if w["acc5"] is not None else "-"
    return [*model, w["name"], f"{w['acc1']:.3f}", acc5]


def _engines(args: argparse.Namespace) -> int:
    if args.models:
        raise ValueError("--engines describes this machine, not models; drop the model names")
    from densenet.infer.optimize import engine_choices

    devices = engine_choices()
    if args.json:
        print_json(devices)
        return 0
    for device in devices:
        if device["device"] == "cpu":
            flags = " ".join(device["flags"]) or "unknown"
            openvino = "installed" if device["openvino"] else "not installed"
            print(
                f"cpu: {device['name']}, kind {device['kind']} (PyTorch capability "
                f"{device['capability']}; flags {flags}; openvino {openvino})"
            )
        else:
            print(f"{device['device']}: {device['name']}")
        rows = [["precision", "engine", "why"]]
        rows += [[e["dtype"], e["engine"], e["measured"]] for e in device["engines"]]
        print("\n".join("  " + line for line in text_table(rows).splitlines()))
    if len(devices) == 1:
        print("cuda: none")
    return 0
