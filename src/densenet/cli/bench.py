"""``densenet bench``: inference speed of every installed engine on the same weights and input."""

from __future__ import annotations

import argparse
import sys

from densenet.choices import BENCH_ENGINES
from densenet.cli.common import MAX_IMAGE_SIZE, integer, print_json
from densenet.data.files import write_json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="inference speed: densenet.optimize against torchvision, ONNX Runtime, OpenVINO",
        description="Time every installed engine in one process on the same weights and input "
        "(outputs checked against float64 first), report medians and the ratio to torchvision "
        "eager float32 (timm eager float32 for an RDNet), print a table last.",
    )
    p.add_argument("--models", nargs="+", default=["densenet121"], help="architectures")
    p.add_argument(
        "--batch-sizes", nargs="+", type=integer(1, 4096), default=[1, 16], help="batch sizes"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "int8"],
        help="precision of the engines that support it (default float32 on CPU, bfloat16 on "
        "CUDA); int8: densenet's int8 next to ONNX Runtime's and OpenVINO's (CPU, each "
        "calibrated on the same images); the eager baseline is always float32",
    )
    p.add_argument(
        "--engines",
        nargs="+",
        help=f"engines to run, of {', '.join(BENCH_ENGINES)} (default all installed)",
    )
    p.add_argument(
        "--image-size", type=integer(1, MAX_IMAGE_SIZE), default=224, help="input height and width"
    )
    p.add_argument("--rounds", type=integer(), default=5, help="interleaved timing rounds")
    p.add_argument("--repeats", type=integer(), help="calls per engine per round (default: ~0.2 s)")
    p.add_argument(
        "--shapes-vary",
        action="store_true",
        help="before timing, run each engine at batch 1 and 64 too (as a service with varying "
        "batch sizes does; a compiled engine then has seen other shapes)",
    )
    p.add_argument("--output", help="write the results and the machine as JSON to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.engines:
        unknown = [e for e in args.engines if e not in BENCH_ENGINES]
        if unknown:
            raise ValueError(f"unknown engines {unknown}; choose from {', '.join(BENCH_ENGINES)}")
    from densenet.tasks.bench import format_table, run_benchmark, to_json

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    results = run_benchmark(
        args.models,
        args.batch_sizes,
        device=args.device,
        dtype=dtype,
        engines=args.engines,
        image_size=args.image_size,
        rounds=args.rounds,
        repeats=args.repeats,
        shapes_vary=args.shapes_vary,
        progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
    )
    report = to_json(results, args.device)
    if args.output:
        write_json(args.output, report)
    if args.json:
        print_json(report)
    else:
        machine = report["machine"]
        where = (
            machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_kind']}: {machine['cpu_flags']}"
        )
        print(f"{where}; torch {machine['torch']}, {machine['threads']} threads")
        print(format_table(results))
    return 0
