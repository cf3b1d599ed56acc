"""The HTTP prediction service: a FastAPI application around a ``Classifier`` and a ``Batcher``.

Endpoints: ``POST /v1/predict`` (images in, top-k out), ``POST /v1/explain`` (one image in, its class
activation map out: an overlay PNG or JSON), ``GET /v1/models``, ``GET|HEAD /healthz``,
``GET|HEAD /readyz``, ``GET /metrics`` (Prometheus) and ``GET /`` (the web page). A request's
limits (images, pixels read from the headers, queue room) are checked before anything is decoded
(``densenet.serve.admission``); images are then decoded and preprocessed by a ``FairDecoder``
(requests served in turn, pixels in flight bounded) with the same code as ``densenet predict``;
the model runs in the batcher's worker thread (``densenet.serve.service``). Bad input is
answered with a 4xx and a JSON ``detail`` message; a model whose output is not finite
(``NonFiniteOutputError``), with a JSON 500, and it never becomes ready when its warm-up output
is not finite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from densenet import __version__
from densenet.infer.runner import NonFiniteOutputError
from densenet.serve.admission import service_of
from densenet.serve.config import ServeConfig
from densenet.serve.middleware import RequestMiddleware
from densenet.serve.responses import Refused, UploadTooLarge, error_response, too_large
from densenet.serve.routes import router
from densenet.serve.service import Service
from densenet.tasks.predict import Classifier

__all__ = ["ServeConfig", "create_app"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the service and its warm-up with the server; stop it with the server."""
    service: Service = app.state.service
    service.start()
    warm_up = asyncio.create_task(service.warm_up())
    try:
        yield
    finally:
        warm_up.cancel()
        await service.stop()


async def _refused(request: Request, error: Refused) -> JSONResponse:
    return error_response(error.status, error.detail, error.headers)


async def _upload_too_large(request: Request, error: UploadTooLarge) -> JSONResponse:
    return too_large(service_of(request).config.max_upload_bytes)


async def _non_finite(request: Request, error: NonFiniteOutputError) -> JSONResponse:
    return error_response(500, str(error))


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
    service = Service(classifier, config, name, weights)
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
    app.add_middleware(RequestMiddleware, service=service)
    app.include_router(router)
    return app
