"""The HTTP prediction service: a FastAPI application around a ``Classifier`` and a ``Batcher``.

Endpoints: ``POST /v1/predict`` (images in, top-k out), ``POST /v1/explain`` (one image in, its class
activation map out: an overlay PNG or JSON), ``GET /v1/models``, ``GET|HEAD /healthz``,
``GET|HEAD /readyz``, ``GET /metrics`` (Prometheus) and ``GET /`` (the web page). A request's
limits (images, pixels read from the headers, queue room) are checked before anything is decoded;
images are then decoded and preprocessed by a ``FairDecoder`` (requests served in turn, pixels in
flight bounded) with the same code as ``densenet predict``; the model runs in the batcher's worker
thread. Bad input is answered with a 4xx and a JSON ``detail`` message; a model whose output is
not finite (``NonFiniteOutputError``), with a JSON 500, and it never becomes ready when its
warm-up output is not finite.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from torch import Tensor

from densenet import __version__
from densenet.data.images import RASTER_FORMATS, ImageError, Reason, check_pixels, open_image
from densenet.data.transforms import CHANNEL_MODES
from densenet.infer.cam import ExplainError
from densenet.infer.runner import NonFiniteOutputError
from densenet.serve.batcher import Batcher, QueueFull
from densenet.serve.decoding import FairDecoder, header_pixels
from densenet.serve.metrics import CONTENT_TYPE, ServiceMetrics
from densenet.serve.schemas import (
    ERRORS,
    EXPLAIN_RESPONSES,
    IMAGE_FIELD,
    PREDICT_BODY,
    PredictResponse,
)
from densenet.tasks.predict import Classifier, Prediction, top_predictions

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
CLIENT_CLOSED = 499  # the status counted for a client that went away before its answer
ENDPOINTS = (
    "/",
    "/v1/predict",
    "/v1/explain",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
)


WARM_UP_SIDE = 256  # pixels: the side of the grey image run through the pipeline at start-up


@dataclass(frozen=True)
class ServeConfig:
    """Limits of the service.

    Args:
        max_batch: most images per forward pass.
        max_wait_ms: longest wait for a batch to fill after its first image arrived, ms.
        max_upload_mb: largest request body, MiB (413 beyond).
        max_queue: most images waiting for the model (503 with Retry-After beyond).
        max_images: most images in one request.
        preprocess_workers: threads decoding and preprocessing images (0: one per CPU, up to 8);
            one request holds at most half of them (at least one) at once.
        max_request_pixels: most pixels in one request, summed over its images as their headers
            declare them (413 beyond, before decoding).
        max_pixels_in_flight: most pixels being decoded at once over all requests (at least
            ``max_request_pixels``); further images wait their turn.
        body_timeout_s: longest time to receive a request body, seconds (408 beyond).
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    max_queue: int = 256
    max_images: int = 32
    preprocess_workers: int = 0
    max_request_pixels: int = 100_000_000
    max_pixels_in_flight: int = 200_000_000
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_wait_ms", "max_upload_mb", "body_timeout_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("max_batch", "max_queue", "max_images", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_request_pixels < WARM_UP_SIDE**2:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels:,}) must be at least "
                f"{WARM_UP_SIDE**2:,}, the {WARM_UP_SIDE}x{WARM_UP_SIDE} warm-up image"
            )
        if self.max_pixels_in_flight < self.max_request_pixels:
            raise ValueError(
                f"max_pixels_in_flight ({self.max_pixels_in_flight:,}) must be at least "
                f"max_request_pixels ({self.max_request_pixels:,}), or a request could never run"
            )
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.max_wait_ms < 0 or self.max_upload_mb <= 0 or self.preprocess_workers < 0:
            raise ValueError(
                f"max_wait_ms ({self.max_wait_ms}) and preprocess_workers "
                f"({self.preprocess_workers}) must be >= 0, max_upload_mb ({self.max_upload_mb}) > 0"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class UploadTooLarge(Exception):
    """The request body grew past the upload limit while it was read."""


class Refused(Exception):
    """A request the service answers with ``status`` and a JSON ``detail`` (``headers``: default
    the status's own, as ``_error`` adds them)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


# ---- the service state ---------------------------------------------------------------------


class _Service:
    """What the endpoints share: the classifier, the batcher, the decoder, the metrics."""

    def __init__(self, classifier: Classifier, config: ServeConfig, model_name: str, weights: Any):
        self.classifier = classifier
        self.config = config
        self.model_name = model_name
        self.weights = weights
        self.ready = False
        self.failure: str | None = None  # why the warm-up failed; the service is then never ready
        self.on_warm_up_failure: Callable[[str], None] = lambda reason: None
        self.batcher = Batcher(
            classifier.probabilities,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
            arriving=lambda: self.decoder is not None and self.decoder.requests_in_flight > 0,
        )
        self.metrics = ServiceMetrics(
            lambda: self.batcher.depth,
            lambda: self.decoder.pixels_in_flight if self.decoder is not None else 0,
        )
        self.batcher.on_batch = self.metrics.on_batch
        self.decoder: FairDecoder | None = None

    def start(self) -> None:
        """Start the decoder and the batcher; call from the running event loop."""
        workers = self.config.preprocess_workers or min(8, os.cpu_count() or 1)
        self.decoder = FairDecoder(
            workers, self.config.max_pixels_in_flight, per_request=max(1, workers // 2)
        )
        self.batcher.start()

    async def stop(self) -> None:
        """Finish the queued images, then stop the batcher and the decoder."""
        self.ready = False
        self.metrics.ready.set(0)
        await self.batcher.close()
        if self.decoder is not None:
            self.decoder.shutdown()

    def preprocess(self, data: bytes, name: str) -> Tensor | ImageError:
        """Decode (raster formats only) and preprocess one upload, or say why it cannot be."""
        try:
            return self.classifier.preprocess(open_image(data), name)
        except ImageError as error:
            return error
        except (
            Exception
        ) as error:  # a decoder failing in an unforeseen way: still the image's fault
            log.warning("%s: decoding failed", name, exc_info=True)
            return ImageError(
                f"{name}: cannot be decoded ({type(error).__name__}: {error})", Reason.CORRUPT
            )

    async def warm_up(self) -> None:
        """The model at every batch size it will run (compiled or captured on CUDA), one image
        through the whole pipeline, then ready."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.classifier.warm_up)
            mode = CHANNEL_MODES.get(self.classifier.card.in_channels, "RGB")
            gray = Image.new(mode, (WARM_UP_SIDE, WARM_UP_SIDE), 128)
            (x,) = await self.decoder.map(
                self.classifier.preprocess, [((gray, "warm-up image"), gray.width * gray.height)]
            )
            await self.batcher.run_once(x.unsqueeze(0))
        except Exception as error:
            log.exception("warm-up failed; the service stays not ready")
            self.failure = f"{type(error).__name__}: {error}"
            self.on_warm_up_failure(self.failure)
            return
        self.ready = True
        self.metrics.ready.set(1)
        log.info("model %s is warmed up and ready", self.model_name)

    def check_open(self) -> None:
        """Refuse (503) a request before the service is ready, loading (retry) or failed (for
        good: no Retry-After), and while its queue is full (retry)."""
        if not self.ready:
            if self.failure is None:
                raise Refused(503, "the model is loading; retry shortly")
            detail = f"the model failed its warm-up ({self.failure}); it will not serve"
            raise Refused(503, detail, headers={})
        if self.batcher.depth >= self.config.max_queue:
            raise Refused(503, f"the queue is full ({self.config.max_queue} images); retry shortly")

    def admit(self, images: list[tuple[str, bytes]]) -> list[int]:
        """The pixels of each image as its header declares them; refuses a request that cannot
        run: 413 for one that never could, 503 for one that cannot now."""
        limits = self.config
        if len(images) > limits.max_queue:
            raise Refused(
                413,
                f"{len(images)} images in one request can never fit the queue of "
                f"{limits.max_queue} (--max-queue); send at most {limits.max_queue} per request",
            )
        pixels = [header_pixels(data, RASTER_FORMATS) for _, data in images]
        if sum(pixels) > limits.max_request_pixels:
            raise Refused(
                413,
                f"the images hold {sum(pixels):,} pixels, over the limit of "
                f"{limits.max_request_pixels:,} per request (--max-request-pixels); send fewer "
                "or smaller images",
            )
        if self.batcher.depth + len(images) > limits.max_queue:
            raise Refused(503, f"the queue is full ({limits.max_queue} images); retry shortly")
        return pixels

    async def classify(
        self, images: list[tuple[str, bytes]], pixels: list[int], topk: int, start: float
    ) -> JSONResponse:
        """Decode and preprocess ``images`` (name, bytes; ``pixels`` each, from ``admit``), batch
        the good ones, and answer each with its top-k or its own error; the request's status is
        200 when any image was classified, else the first error's."""
        inputs = await self.decoder.map(
            self.preprocess, [((data, src), n) for (src, data), n in zip(images, pixels)]
        )
        preprocessed = time.perf_counter()
        good = [x for x in inputs if isinstance(x, Tensor)]
        self.metrics.images.labels(outcome="ok").inc(len(good))
        self.metrics.images.labels(outcome="error").inc(len(inputs) - len(good))
        try:
            futures = self.batcher.submit(good)
            results = iter(await asyncio.gather(*futures, return_exceptions=True))
        except QueueFull as error:
            return _error(503, str(error))
        predictions, queue_s, inference_s = [], 0.0, 0.0
        categories = self.classifier.categories
        for (source, _), x in zip(images, inputs):
            if isinstance(x, ImageError):
                entry = Prediction(source, [], [], [], str(x), x.reason).to_dict()
                predictions.append({**entry, "status": _status_of(x)})
                continue
            result = next(results)
            if isinstance(result, BaseException):  # the model failed on this image alone
                status = 503 if isinstance(result, QueueFull) else 500
                failure = f"{source}: inference failed ({type(result).__name__}: {result})"
                entry = Prediction(source, [], [], [], error=failure).to_dict()
                predictions.append({**entry, "status": status})
                continue
            (prediction,) = top_predictions([source], result.output[None], topk, categories)
            if self.classifier.card.multi_label:
                (prediction.positive,) = self.classifier.card.positive(result.output[None])
            predictions.append({**prediction.to_dict(), "batch_size": result.batch_size})
            queue_s, inference_s = (
                max(queue_s, result.queue_s),
                max(inference_s, result.inference_s),
            )
        body = {
            "model": self.model_name,
            "predictions": predictions,
            "timing": {
                "total_ms": (time.perf_counter() - start) * 1000,
                "preprocess_ms": (preprocessed - start) * 1000,
                "queue_ms": queue_s * 1000,
                "inference_ms": inference_s * 1000,
            },
        }
        if any("error" not in p for p in predictions):
            return JSONResponse(body)
        first = next(p for p in predictions if "error" in p)
        return JSONResponse({"detail": first["error"], **body}, status_code=first["status"])


def _status_of(error: ImageError) -> int:
    """415 for data that is no image format at all, 400 for a broken or refused image."""
    return 415 if error.reason is Reason.NOT_AN_IMAGE else 400


_HEADERS = {
    503: {"Retry-After": str(RETRY_AFTER_S)},
    408: {"Connection": "close"},  # the rest of a body that came too slowly is not awaited
}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer ``{"detail": detail}`` with the status's headers unless ``headers``."""
    headers = _HEADERS.get(status) if headers is None else headers
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# ---- middleware: request metrics and the upload limit ----------------------------------------


class _RequestMiddleware:
    """Counts requests by endpoint and status, times them, and refuses bodies over the limit
    (413): at once from Content-Length, or while reading a body sent without one. A client that
    disconnects before its answer is counted as 499; a request still running when the server's
    shutdown grace period ends (the server cancels it) is answered with a JSON 503."""

    def __init__(self, app, service: _Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.service.metrics
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        counted = endpoint != "/metrics"
        status, responded = 500, False
        start = time.perf_counter()

        async def send_wrapper(message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
            await send(message)

        limit = self.service.config.max_upload_bytes
        received = 0

        async def receive_wrapper():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge
            return message

        if counted:
            metrics.in_flight.inc()
        try:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                await _too_large(limit)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except ClientDisconnect:
            status = CLIENT_CLOSED
            log.info("%s %s: the client disconnected before its answer", scope["method"], endpoint)
        except asyncio.CancelledError:
            # the server cancels what is still running at the end of its shutdown grace period;
            # the answer is the last thing this request does, so the cancellation ends here
            if responded:
                raise
            log.warning("%s %s: cut short by the server's shutdown", scope["method"], endpoint)
            await _error(503, "the server shut down before this request finished; retry")(
                scope, receive, send_wrapper
            )
        finally:
            if counted:
                metrics.in_flight.dec()
            metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body is over the limit of {limit / 1024 / 1024:g} MiB")


# ---- admission: the query, readiness, the body, the limits -----------------------------------


def _service(request: Request) -> _Service:
    return request.app.state.service


def _refuse_unknown(request: Request, names: set[str], known: str) -> None:
    """Refuse (422) a query parameter not in ``names``; ``known`` lists them for the message."""
    unknown = sorted(set(request.query_params) - names)
    if unknown:
        raise Refused(422, f"unknown query parameter {unknown[0]!r}; {known}")


async def _topk(
    request: Request,
    topk: int = Query(5, ge=1, description="labels per image (at most the class count)"),
) -> int:
    """``/v1/predict``'s query: the labels per image, capped at the class count as the CLI and
    bulk cap it."""
    _refuse_unknown(request, {"topk"}, "the only one is 'topk'")
    return min(topk, len(_service(request).classifier.categories))


async def _explain_query(
    request: Request,
    target: str | None = Query(None, description="a class name; default the top class"),
    format: str = Query("png", pattern="^(png|json)$", description="png or json"),
) -> tuple[str | None, str]:
    """``/v1/explain``'s query: the class to explain and the answer's format."""
    _refuse_unknown(request, {"target", "format"}, "the parameters: target, format")
    return target, format


@dataclass(frozen=True)
class Admitted:
    """A request let in: what its query dependency returned, its images (name, bytes), their
    pixels as their headers declare them, and when it was let in (``time.perf_counter``)."""

    query: Any
    images: list[tuple[str, bytes]]
    pixels: list[int]
    start: float


def admission(
    query: Callable[..., Any], *, one_image: bool = False
) -> Callable[..., Awaitable[Admitted]]:
    """The dependency letting a request in, each step raising ``Refused``: ``query`` (a
    dependency checking the query parameters) first, then the service ready with room in its
    queue (503), the body read (``_read_images``; exactly one image if ``one_image``), and the
    images against the queue and pixel limits (413, 503) before any is decoded."""

    after_query = Depends(query)  # resolved before the rest, so a bad query is answered first

    async def admit(request: Request, params: Any = after_query) -> Admitted:
        start = time.perf_counter()
        service = _service(request)
        service.check_open()
        images = await _read_images(request, service.config)
        if one_image and len(images) != 1:
            raise Refused(422, f"explain takes one image, got {len(images)}")
        return Admitted(params, images, service.admit(images), start)

    return admit


PredictAdmitted = Annotated[Admitted, Depends(admission(_topk))]
ExplainAdmitted = Annotated[Admitted, Depends(admission(_explain_query, one_image=True))]


# ---- the endpoints -----------------------------------------------------------------------------

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page, headers={"X-Content-Type-Options": "nosniff"})


@router.get("/healthz", summary="liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz", summary="readiness: weights loaded and a warm-up batch ran", responses={503: {}}
)
async def readyz(request: Request) -> JSONResponse:
    service = _service(request)
    if service.ready:
        return JSONResponse({"status": "ready"})
    if service.failure is not None:
        return JSONResponse({"status": "failed", "detail": service.failure}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})


for _path, _probe in (("/healthz", healthz), ("/readyz", readyz)):  # load balancers use HEAD
    router.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", summary="the loaded model and its weights")
async def models(request: Request) -> dict[str, Any]:
    service = _service(request)
    c, config = service.classifier, service.config
    return {
        "models": [
            {
                "name": service.model_name,
                "weights": service.weights,
                "num_classes": len(c.categories),
                # the model's weights as loaded, whatever form runs them (count_weights)
                "parameters": c.runner.weights_count,
                "device": str(c.device),
                "min_size": list(c.min_size),
                "max_batch": config.max_batch,
                "max_wait_ms": config.max_wait_ms,
                "max_upload_mb": config.max_upload_mb,
                "max_images": config.max_images,
                "max_request_pixels": config.max_request_pixels,
                "body_timeout_s": config.body_timeout_s,
                "ready": service.ready,
            }
        ]
    }


@router.post(
    "/v1/predict",
    summary="top-k labels of one or several images",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
)
async def predict(request: Request, admitted: PredictAdmitted) -> JSONResponse:
    return await _service(request).classify(
        admitted.images, admitted.pixels, admitted.query, admitted.start
    )


@router.post(
    "/v1/explain",
    summary="class activation map of one image: an overlay PNG, or the map as JSON",
    responses=EXPLAIN_RESPONSES,
    openapi_extra=PREDICT_BODY,
)
async def explain(request: Request, admitted: ExplainAdmitted) -> Response:
    service = _service(request)
    (name, data), (target, format) = admitted.images[0], admitted.query
    # the network runs in the model's thread, as predict's
    return await service.batcher.call(_explain, service.classifier, name, data, target, format)


# ---- the application ---------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the service and its warm-up with the server; stop it with the server."""
    service: _Service = app.state.service
    service.start()
    warm_up = asyncio.create_task(service.warm_up())
    try:
        yield
    finally:
        warm_up.cancel()
        await service.stop()


async def _refused(request: Request, error: Refused) -> JSONResponse:
    return _error(error.status, error.detail, error.headers)


async def _upload_too_large(request: Request, error: UploadTooLarge) -> JSONResponse:
    return _too_large(_service(request).config.max_upload_bytes)


async def _non_finite(request: Request, error: NonFiniteOutputError) -> JSONResponse:
    return _error(500, str(error))


def create_app(
    classifier: Classifier,
    config: ServeConfig | None = None,
    *,
    model_name: str | None = None,
    weights: dict[str, Any] | None = None,
    on_warm_up_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service for ``classifier``; it is ready (``/readyz``) after a warm-up batch.

    Args:
        classifier: the model, its preprocessing and class names.
        config: limits (batch size, wait, upload size, queue).
        model_name: shown in responses; default the model's architecture name.
        weights: JSON-ready metadata of the weights, shown by ``GET /v1/models``.
        on_warm_up_failure: called with the reason when the warm-up fails (``serve`` stops the
            server then); by default the service stays up, not ready.
    """
    if classifier.card.volume is not None:
        raise ValueError("the service classifies uploaded images; this model takes volumes")
    config = config or ServeConfig()
    name = model_name or classifier.card.arch or type(classifier.model).__name__
    service = _Service(classifier, config, name, weights)
    if on_warm_up_failure is not None:
        service.on_warm_up_failure = on_warm_up_failure
    app = FastAPI(
        title="densenet",
        summary="DenseNet image classification: top-k ImageNet labels",
        version=__version__,
        lifespan=_lifespan,
        exception_handlers={
            Refused: _refused,
            UploadTooLarge: _upload_too_large,
            NonFiniteOutputError: _non_finite,
        },
        docs_url=None,  # the interactive docs load scripts from a CDN; the service works offline
        redoc_url=None,
    )
    app.state.service = service
    app.state.page = files(__package__).joinpath("static", "index.html").read_text("utf-8")
    app.add_middleware(_RequestMiddleware, service=service)
    app.include_router(router)
    return app


def _explain(
    classifier: Classifier, name: str, data: bytes, target: str | None, format: str
) -> Response:
    """One upload's class activation map (``Classifier.explain``) as a PNG overlay or JSON."""
    try:
        image = open_image(data)
        check_pixels(image, name)
        (explanation,) = classifier.explain([image], target)
    except ImageError as error:
        return _error(_status_of(error), str(error))
    except ExplainError as error:
        return _error(501, str(error))
    except ValueError as error:  # an unknown target class
        return _error(422, str(error))
    if format == "json":
        return JSONResponse(
            {
                "source": name,
                "label": explanation.label,
                "index": explanation.index,
                "probability": explanation.probability,
                "cam": explanation.cam.tolist(),
            }
        )
    buffer = io.BytesIO()
    explanation.overlay().save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")


async def _read_images(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image: the ``file`` parts of a multipart body, or the raw body.
    The body must arrive within ``config.body_timeout_s`` (408); a malformed one is refused."""
    try:
        body = await asyncio.wait_for(request.body(), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise Refused(
            408, f"the request body did not arrive within {config.body_timeout_s:g} s"
        ) from None
    content_type = request.headers.get("content-type", "")
    media_type, options = parse_options_header(content_type)
    if media_type.lower() != b"multipart/form-data":
        return [("body", body)]
    try:
        form = await request.form(max_files=config.max_images, max_fields=config.max_images)
    except HTTPException as error:  # malformed multipart, too many parts
        raise Refused(error.status_code, f"multipart body: {error.detail}") from None
    close = b"--" + options[b"boundary"] + b"--"
    if not (body.startswith(close) or b"\r\n" + close in body):
        await form.close()
        raise Refused(400, "multipart body: unterminated (no closing boundary); parts may be lost")
    try:
        images = []
        for key, value in form.multi_items():
            if key == "topk":
                raise Refused(422, "field 'topk': topk is a query parameter (/v1/predict?topk=5)")
            if key != IMAGE_FIELD:
                raise Refused(422, f"unknown field {key[:64]!r}; send images in the field 'file'")
            if not isinstance(value, UploadFile):
                raise Refused(422, "field 'file' must be a file part (with a filename), not text")
            name = (value.filename or f"image {len(images)}")[:200]
            images.append((name, await value.read()))
    finally:
        await form.close()
    if not images:
        raise Refused(422, "no image: send one or more files in the multipart field 'file'")
    return images
