"""The ``densenet`` command line: one sub-command per job, each with ``--help``.

Errors are reported as one line on stderr (exit status 2); ``DENSENET_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _add_model_args(
    parser: argparse.ArgumentParser, weights_default: str | None = "DEFAULT"
) -> None:
    parser.add_argument("--model", default="densenet121", help="architecture (see `densenet info`)")
    parser.add_argument(
        "--weights",
        default=weights_default,
        help="weights name (DEFAULT, IMAGENET1K_V1), or a local .pth/.pt/.safetensors file",
    )


# ---- predict -------------------------------------------------------------------------------


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images: top-k labels with probabilities",
        description="Classify images. --model also takes an exported .onnx file, run with ONNX "
        "Runtime (class names and preprocessing from the file).",
    )
    p.add_argument("images", nargs="+", help="image files or folders of images")
    _add_model_args(p)
    p.add_argument("--topk", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1...")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
    from .predict import Classifier, find_images

    paths = find_images(args.images)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.images)}")
    classifier = Classifier(args.model, args.weights, args.device, batch_size=args.batch_size)
    predictions = classifier.classify(paths, topk=args.topk)
    if args.json:
        _print_json([p.to_dict() for p in predictions])
    else:
        for p in predictions:
            if p.error is not None:
                print(f"error: {p.error}", file=sys.stderr)
                continue
            print(p.source)
            for label, probability in p.top:
                print(f"  {probability:7.2%}  {label}")
    return 1 if any(p.error is not None for p in predictions) else 0


# ---- info ----------------------------------------------------------------------------------


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="the models: parameters, GFLOPs, weights, accuracy")
    p.add_argument("models", nargs="*", help="architectures (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_info)


def _info(args: argparse.Namespace) -> int:
    from .registry import list_models, model_info
    from .weights import WEIGHTS

    rows = []
    for name in args.models or list_models():
        info = model_info(name)
        entries = {w.name: w for w in WEIGHTS.get(name, {}).values()}
        info["weights"] = [w.meta() for w in entries.values()]
        rows.append(info)
    if args.json:
        _print_json(rows)
        return 0
    table = [["model", "params", "GFLOPs", "input", "classes", "weights", "acc@1", "acc@5"]]
    for info in rows:
        w = info["weights"][0] if info["weights"] else None
        table.append([
            info["name"], f"{info['params'] / 1e6:.2f}M", f"{info['gflops']:.2f}",
            str(info["input_size"]), str(info["num_classes"]), w["name"] if w else "-",
            f"{w['acc1']:.3f}" if w else "-", f"{w['acc5']:.3f}" if w else "-",
        ])  # fmt: skip
    print(_table(table))
    return 0


# ---- weights -------------------------------------------------------------------------------


def _weights_parser(sub) -> None:
    p = sub.add_parser("weights", help="download, verify or convert weight files")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = actions.add_parser("download", help="fetch official weights into the cache")
    d.add_argument("models", nargs="*", help="architectures (default: all with weights)")
    d.add_argument("--weights", default="DEFAULT", help="weights name (default DEFAULT)")
    v = actions.add_parser("verify", help="check a file's SHA-256 and that it loads")
    v.add_argument("target", help="a weights file, or an architecture (its cached file)")
    v.add_argument("--model", help="architecture the file is for (default: from its name)")
    c = actions.add_parser("convert", help="convert a checkpoint to safetensors, current keys")
    c.add_argument("source", help="a .pth/.pt/.safetensors file (old or new key names)")
    c.add_argument("dest", help="output .safetensors file")
    c.add_argument(
        "--model", help="architecture to check the file against (default: from its name)"
    )
    for q in (d, v, c):
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_weights)


def _arch_of(path: str, model: str | None) -> str | None:
    from .registry import list_models

    if model:
        return model
    stem = Path(path).name.split("-")[0].split(".")[0]
    return stem if stem in list_models() else None


def _weights(args: argparse.Namespace) -> int:
    from .registry import get_model, list_models
    from .weights import WEIGHTS, fetch, get_weights, load_checkpoint, verify_file

    report: list[dict] = []
    if args.action == "download":
        for arch in args.models or list(WEIGHTS):
            entry = get_weights(arch, args.weights)
            report.append({"model": arch, "path": str(fetch(entry)), "url": entry.url})
    elif args.action == "verify":
        target = args.target
        if target in list_models():
            entry = get_weights(target)
            target, arch = str(entry.cache_path), entry.arch
        else:
            arch = _arch_of(target, args.model)
        digest = verify_file(target)
        if arch is not None:
            get_model(arch, weights=target)
        report.append({"path": target, "sha256": digest, "loads_into": arch})
    else:
        from safetensors.torch import save_file

        state = load_checkpoint(args.source)
        arch = _arch_of(args.source, args.model)
        if arch is not None:
            get_model(arch).load_state_dict(state, strict=True)
        save_file({k: v.contiguous() for k, v in state.items()}, args.dest)
        report.append({"source": args.source, "dest": args.dest, "checked_against": arch})
    if args.json:
        _print_json(report)
    else:
        for item in report:
            print("  ".join(f"{k}: {v}" for k, v in item.items()))
    return 0


# ---- serve ---------------------------------------------------------------------------------


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP prediction service with dynamic batching and a web page",
        description="Serve POST /v1/predict, GET /v1/models, /healthz, /readyz, /metrics and the "
        "web page at /. `--weights none` serves random weights (for load tests).",
    )
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1...")
    p.add_argument("--max-batch", type=int, default=32, help="most images per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (413)")
    p.add_argument("--max-queue", type=int, default=256, help="most images waiting (503 beyond)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServeConfig, serve, weights_metadata
    except ImportError as error:
        raise RuntimeError(f"{error}; install it with: pip install 'densenet[serve]'") from None
    from .predict import Classifier

    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_queue=args.max_queue,
    )
    weights = None if str(args.weights).lower() == "none" else args.weights
    classifier = Classifier(args.model, weights, args.device, batch_size=args.max_batch)
    meta = weights_metadata(classifier, weights)
    serve(
        classifier,
        config,
        host=args.host,
        port=args.port,
        model_name=args.model,
        weights=meta,
        log_level=args.log_level,
    )
    return 0


# ---- export --------------------------------------------------------------------------------


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as ONNX, TorchScript or a torch.export program (.pt2)",
        description="Export for deployment. Input (N, 3, H, W) normalised images, output "
        "(N, classes) logits; class names and preprocessing are stored in the file. Batch, height "
        "and width are dynamic unless --batch-size / --image-size fix them. `--weights none` "
        "exports random weights.",
    )
    _add_model_args(p)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported"])
    p.add_argument("--out", help="output file (.onnx, .pt, .pt2); optional with --triton-repo")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, help="fix the batch size (default: dynamic)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis (default)")
    p.add_argument("--image-size", type=int, help="fix height and width (default: any size)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--fold", action="store_true", help="the inference form (BatchNorm folded)")
    p.add_argument("--opset", type=int, help="ONNX operator set, 18 or newer (default 18)")
    p.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository")
    p.add_argument("--triton-max-batch", type=int, default=64, help="Triton max_batch_size (64)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from .export import DEFAULT_OPSET, export, write_triton_repo
    from .registry import get_model

    onnx_only = {"--opset": args.opset is not None, "--triton-repo": args.triton_repo is not None}
    for flag, given in onnx_only.items():
        if given and args.format != "onnx":
            raise ValueError(f"{flag} applies to --format onnx only")
    if args.out is None and args.triton_repo is None:
        raise ValueError("give the output file with --out FILE")
    options = {"batch_size": args.batch_size, "image_size": args.image_size}
    options.update(dtype=args.dtype, fold=args.fold)
    if args.format == "onnx":
        options["opset"] = DEFAULT_OPSET if args.opset is None else args.opset
    weights = None if str(args.weights).lower() == "none" else args.weights
    model = get_model(args.model, weights=weights)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, "model.onnx")
        path = export(model, out, args.format, **options)
        report = {"format": args.format, "model": args.model, "weights": weights, **options}
        report["size_mb"] = round(path.stat().st_size / 1e6, 3)
        if args.out is not None:
            report["path"] = str(path)
        if args.triton_repo is not None:
            folder = write_triton_repo(path, args.triton_repo, max_batch_size=args.triton_max_batch)
            report["triton_model"] = str(folder)
    if args.json:
        _print_json(report)
    else:
        print("  ".join(f"{k}: {v}" for k, v in report.items() if v is not None))
    return 0


# ---- entry point ---------------------------------------------------------------------------

PARSERS: list[Callable] = [
    _predict_parser,
    _info_parser,
    _weights_parser,
    _serve_parser,
    _export_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densenet",
        description="Dense Convolutional Networks: classify, evaluate, train, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in PARSERS:
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("densenet: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; DENSENET_DEBUG=1 for the traceback
        if os.environ.get("DENSENET_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"densenet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
