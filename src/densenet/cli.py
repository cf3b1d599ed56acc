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


def _print_report(report: dict | list[dict], as_json: bool) -> None:
    """JSON, or one ``key: value`` line per record (nested values and None left out)."""
    if as_json:
        _print_json(report)
        return
    for record in report if isinstance(report, list) else [report]:
        fields = (
            f"{k}: {v}" for k, v in record.items() if v is not None and not isinstance(v, dict)
        )
        print("  ".join(fields))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _weights_value(text: str) -> str | None:
    """A ``--weights`` value: ``none`` means random initialisation."""
    return None if text.lower() == "none" else text


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="densenet121", help="architecture (see `densenet info`)")
    parser.add_argument(
        "--weights",
        type=_weights_value,
        default="DEFAULT",
        help="weights name (DEFAULT, IMAGENET1K_V1), a local .pth/.pt/.safetensors file, "
        "or none (random initialisation)",
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
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="run the reference module instead of the fast inference form (densenet.optimize)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
    from .predict import Classifier, find_images

    paths = find_images(args.images)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.images)}")
    classifier = Classifier(
        args.model,
        args.weights,
        args.device,
        batch_size=args.batch_size,
        optimize=not args.no_optimize,
    )
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
    from .weights import WEIGHTS, WeightsError, fetch, get_weights, load_checkpoint, verify_file

    report: list[dict] = []
    if args.action == "download":
        for arch in args.models or list(WEIGHTS):
            entry = get_weights(arch, args.weights)
            report.append({"model": arch, "path": str(fetch(entry)), "url": entry.url})
    elif args.action == "verify":
        target = args.target
        if target in list_models():
            entry = get_weights(target)
            if not entry.cache_path.is_file():
                raise WeightsError(
                    f"{target}'s weights are not cached ({entry.cache_path}); "
                    f"run `densenet weights download {target}`"
                )
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
    _print_report(report, args.json)
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
    classifier = Classifier(args.model, args.weights, args.device, batch_size=args.max_batch)
    meta = weights_metadata(classifier, args.weights)
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
        "and width are dynamic unless --batch-size / --image-size fix them (TorchScript always "
        "takes any; there they set the tracing example). `--weights none` exports random weights.",
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
    p.add_argument("--triton-max-batch", type=int, help="Triton max_batch_size (default 64)")
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
    if args.triton_max_batch is not None and args.triton_repo is None:
        raise ValueError("--triton-max-batch applies with --triton-repo DIR only")
    if args.out is None and args.triton_repo is None:
        raise ValueError("give the output file with --out FILE")
    options = {"batch_size": args.batch_size, "image_size": args.image_size}
    options.update(dtype=args.dtype, fold=args.fold)
    if args.format == "onnx":
        options["opset"] = DEFAULT_OPSET if args.opset is None else args.opset
    model = get_model(args.model, weights=args.weights)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or os.path.join(scratch, "model.onnx")
        path = export(model, out, args.format, **options)
        report = {"format": args.format, "model": args.model, "weights": args.weights, **options}
        report["size_mb"] = round(path.stat().st_size / 1e6, 3)
        if args.out is not None:
            report["path"] = str(path)
        if args.triton_repo is not None:
            max_batch = 64 if args.triton_max_batch is None else args.triton_max_batch
            folder = write_triton_repo(path, args.triton_repo, args.model, max_batch)
            report["triton_model"] = str(folder)
    _print_report(report, args.json)
    return 0


# ---- eval ----------------------------------------------------------------------------------


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 error on an ImageNet-style folder or a named data set",
        description="Evaluate a model: top-1 and top-5 error (%) and images/s (end to end, "
        "decoding included). Single-crop uses the weights' own transform; --ten-crop the "
        "paper's. Under torchrun the data is sharded over the processes.",
    )
    p.add_argument(
        "data",
        help="a folder with one sub-folder per class (or with train/ and val/: val/ is used), "
        "or cifar10, cifar100, svhn (their test sets)",
    )
    p.add_argument("--model", help="architecture (default densenet121, or the checkpoint's)")
    p.add_argument(
        "--weights",
        type=_weights_value,
        default="DEFAULT",
        help="weights name (DEFAULT), a .pth/.safetensors file, or a checkpoint of `densenet train`",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=4, help="data loading processes (default 4)")
    p.add_argument("--ten-crop", action="store_true", help="ten crops, softmax averaged")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda...")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast")
    p.add_argument(
        "--no-optimize", action="store_true", help="run the eager model, not densenet.optimize"
    )
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_eval)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root",
        help="folder of named data sets (default $DENSENET_DATA, ~/.cache/densenet/data)",
    )
    p.add_argument("--no-download", action="store_true", help="never download a named data set")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_dataset

    result = evaluate_dataset(
        args.data,
        args.model or "densenet121",
        args.weights,
        model_given=args.model is not None,
        ten_crop=args.ten_crop,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        data_root=args.data_root,
        download=not args.no_download,
        progress=not args.no_progress,
        optimize=not args.no_optimize,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        _print_json(result)
    else:
        print(
            f"{result['model']} on {result['data']} ({result['images']} images, "
            f"{result['crops']} crop{'s' if result['crops'] > 1 else ''}): "
            f"top-1 error {result['top1_error']:.3f}%  top-5 error {result['top5_error']:.3f}%  "
            f"{result['images_per_second']:.1f} images/s"
        )
        if result["skipped"]:
            print(f"skipped {result['skipped']} unreadable images", file=sys.stderr)
    return 0


# ---- train ---------------------------------------------------------------------------------

# command-line flag -> TrainConfig field, for the flags that map one to one
_TRAIN_FLAGS = {
    "model": (str, "architecture (see `densenet info`)"),
    "data": (str, "cifar10, cifar100, svhn, or a folder with train/ and val/ class folders"),
    "epochs": (int, "epochs"),
    "batch_size": (int, "global batch size (over all processes)"),
    "lr": (float, "initial learning rate"),
    "weight_decay": (float, "weight decay"),
    "drop_rate": (float, "dropout after each convolution but the first"),
    "image_size": (int, "training and evaluation crop size, pixels"),
    "weights": (str, "start from these weights (DEFAULT, a file, or none)"),
    "seed": (int, "random seed"),
    "accumulate": (int, "micro-batches per optimizer step (gradient accumulation)"),
    "out": (str, "output folder (default runs/RECIPE)"),
    "workers": (int, "data loading processes per training process"),
    "device": (str, "auto (GPU when present), cpu, cuda..."),
    "amp": (str, "auto (bf16 on GPUs that have it), none, bf16, fp16"),
    "checkpoint_every_steps": (int, "also checkpoint every N steps inside epochs"),
}


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train with one of the paper's recipes; resume after any crash",
        description="Train a DenseNet. Recipes: cifar10, cifar10+, cifar100, cifar100+, svhn, "
        "imagenet (the paper's, section 4.2) and finetune (official weights, new classifier). "
        "Every recipe value can be overridden with its flag or --set KEY=VALUE; the resolved "
        "configuration is written to OUT/config.json. Multi-GPU / multi-node: "
        "torchrun --nproc-per-node N -m densenet train ...",
    )
    p.add_argument("--recipe", required=True, help="cifar10, cifar10+, cifar100, cifar100+, ...")
    for name, (kind, text) in _TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    flags = {"compile": "torch.compile the model", "memory_efficient": "memory-efficient blocks"}
    flags.update(sync_bn="SyncBatchNorm across processes (GPU)", deterministic="reproducible")
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=text)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on GPU")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting"
    )
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    import logging

    from .train import make_config, parse_override, train

    names = [*_TRAIN_FLAGS, "compile", "memory_efficient", "sync_bn", "deterministic"]
    overrides = {
        n: getattr(args, n) for n in [*names, "channels_last"] if getattr(args, n) is not None
    }
    overrides.update(data_root=args.data_root, download=not args.no_download)
    if "weights" in overrides:
        overrides["weights"] = _weights_value(overrides["weights"])
    if args.no_progress:
        overrides["progress"] = False
    overrides.update(parse_override(item) for item in args.set)
    config = make_config(args.recipe, **overrides)
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING, format="%(message)s"
    )
    summary = train(config, resume=args.resume)
    if not main_process:
        return 0
    _print_report(summary, args.json)
    if not args.json and "test" in summary:
        test = summary["test"]
        print(f"test: top-1 error {test['top1_error']:.3f}%  top-5 error {test['top5_error']:.3f}%")
    return 0


# ---- bench ----------------------------------------------------------------------------------


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="inference speed: densenet.optimize against torchvision, ONNX Runtime, OpenVINO",
        description="Time every installed engine in one process on the same weights and input "
        "(outputs checked against float64 first), report medians and the ratio to torchvision "
        "eager float32, print a table last.",
    )
    p.add_argument("--models", nargs="+", default=["densenet121"], help="architectures")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16], help="batch sizes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="precision of the engines that support it (default float32 on CPU, bfloat16 on "
        "CUDA); the torchvision eager baseline is always float32",
    )
    p.add_argument("--engines", nargs="+", help="engines to run (default all installed)")
    p.add_argument("--image-size", type=int, default=224, help="input height and width")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--repeats", type=int, help="calls per engine per round (default: ~0.2 s)")
    p.add_argument("--output", help="write the results and the machine as JSON to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .benchmark import ENGINES, format_table, run_benchmark, to_json

    if args.engines:
        unknown = [e for e in args.engines if e not in ENGINES]
        if unknown:
            raise ValueError(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
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
        progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
    )
    report = to_json(results, args.device)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    if args.json:
        _print_json(report)
    else:
        print(format_table(results))
    return 0


# ---- entry point ---------------------------------------------------------------------------

PARSERS: list[Callable] = [
    _predict_parser,
    _info_parser,
    _weights_parser,
    _serve_parser,
    _export_parser,
    _eval_parser,
    _train_parser,
    _bench_parser,
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
        if os.environ.get("DENSENET_DEBUG", "") not in ("", "0"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"densenet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
