"""``densenet weights``: download official files into the cache, verify or convert a file."""

from __future__ import annotations

import argparse

from densenet.cli.common import print_report


def add_parser(sub) -> None:
    p = sub.add_parser("weights", help="download, verify or convert weight files")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = actions.add_parser("download", help="fetch official weights into the cache")
    d.add_argument("models", nargs="*", help="architectures (default: all with weights)")
    d.add_argument("--weights", default="DEFAULT", help="weights name (default DEFAULT)")
    v = actions.add_parser("verify", help="check a file's SHA-256 and that it loads")
    v.add_argument("target", help="a weights file, or an architecture (its cached file)")
    v.add_argument(
        "--model",
        help="architecture the file is for (default: from its name, else from its keys and shapes)",
    )
    c = actions.add_parser("convert", help="convert a checkpoint to safetensors, current keys")
    c.add_argument("source", help="a .pth/.pt/.safetensors file (old or new key names)")
    c.add_argument("dest", help="output .safetensors file")
    c.add_argument(
        "--model", help="architecture to check the file against (default: from its name)"
    )
    for q in (d, v, c):
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from densenet.infer.load import convert_weights, verify_weights
    from densenet.weights.download import fetch
    from densenet.weights.published import WEIGHTS, get_weights

    if args.action == "download":
        report = []
        for arch in args.models or list(WEIGHTS):
            entry = get_weights(arch, args.weights)
            report.append({"model": arch, "path": str(fetch(entry)), "url": entry.url})
    elif args.action == "verify":
        report = [verify_weights(args.target, args.model)]
    else:
        report = [convert_weights(args.source, args.dest, args.model)]
    print_report(report, args.json)
    return 0
