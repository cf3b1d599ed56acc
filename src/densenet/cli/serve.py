"""``densenet serve``: the HTTP prediction service."""

from __future__ import annotations

import argparse

from densenet.cli.common import (
    add_device_arg,
    add_dtype_arg,
    add_model_args,
    check_calibration_images,
    integer,
    model_options,
    number,
    warn_if_random,
)
from densenet.errors import DenseNetError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP prediction service with dynamic batching and a web page",
        description="Serve POST /v1/predict, GET /v1/models, /healthz, /readyz, /metrics and the "
        "web page at /. `--weights none` serves random weights (for load tests).",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="TCP port")
    add_device_arg(p)
    add_dtype_arg(p)
    p.add_argument("--max-batch", type=integer(), default=32, help="most images per forward pass")
    p.add_argument(
        "--max-wait-ms",
        type=number(),
        default=5.0,
        help="longest wait to fill a batch (only while other requests are being decoded)",
    )
    p.add_argument(
        "--max-upload-mb", type=number(0.001), default=10.0, help="largest request body (413)"
    )
    p.add_argument(
        "--max-queue", type=integer(), default=256, help="most images waiting (503 beyond)"
    )
    p.add_argument(
        "--max-request-pixels",
        type=integer(),
        default=100_000_000,
        help="most pixels in one request, summed over its images, read from their headers before "
        "decoding (413 beyond; default 100,000,000)",
    )
    p.add_argument(
        "--max-pixels-in-flight",
        type=integer(),
        default=200_000_000,
        help="most pixels being decoded at once over all requests; more wait their turn "
        "(at least --max-request-pixels; default 200,000,000)",
    )
    p.add_argument(
        "--body-timeout-s",
        type=number(0.001),
        default=30.0,
        help="longest time to receive a request body, seconds (408 beyond; default 30)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_calibration_images(args)
    warn_if_random(args)
    try:
        from densenet.serve import ServeConfig, serve, weights_metadata
    except ImportError as error:
        raise DenseNetError(
            f"{error}; install it with: pip install 'densenet-toolkit[serve]'"
        ) from None
    from densenet.tasks.predict import Classifier

    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_queue=args.max_queue,
        max_request_pixels=args.max_request_pixels,
        max_pixels_in_flight=args.max_pixels_in_flight,
        body_timeout_s=args.body_timeout_s,
    )
    classifier = Classifier(
        args.model, args.weights, args.device, batch_size=args.max_batch, **model_options(args)
    )
    serve(
        classifier,
        config,
        host=args.host,
        port=args.port,
        model_name=classifier.card.arch or args.model,
        weights=weights_metadata(classifier, args.weights),
        log_level=args.log_level,
    )
    return 0
