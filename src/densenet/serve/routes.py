"""The service's endpoints, one module-level router for every application: each handler takes
what its admission dependency let in, calls the service, and formats the answer."""

from __future__ import annotations

import io
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from densenet.data.images import ImageError, check_pixels, open_image
from densenet.infer.cam import ExplainError
from densenet.serve.admission import ExplainAdmitted, PredictAdmitted, service_of
from densenet.serve.metrics import CONTENT_TYPE
from densenet.serve.responses import error_response, status_of
from densenet.serve.schemas import ERRORS, EXPLAIN_RESPONSES, PREDICT_BODY, PredictResponse
from densenet.tasks.predict import Classifier

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
    service = service_of(request)
    if service.ready:
        return JSONResponse({"status": "ready"})
    if service.failure is not None:
        return JSONResponse({"status": "failed", "detail": service.failure}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})


for _path, _probe in (("/healthz", healthz), ("/readyz", readyz)):  # load balancers use HEAD
    router.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", summary="the loaded model and its weights")
async def models(request: Request) -> dict[str, Any]:
    service = service_of(request)
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
    return await service_of(request).classify(
        admitted.images, admitted.pixels, admitted.query, admitted.start
    )


@router.post(
    "/v1/explain",
    summary="class activation map of one image: an overlay PNG, or the map as JSON",
    responses=EXPLAIN_RESPONSES,
    openapi_extra=PREDICT_BODY,
)
async def explain(request: Request, admitted: ExplainAdmitted) -> Response:
    service = service_of(request)
    (name, data), (target, format) = admitted.images[0], admitted.query
    # the network runs in the model's thread, as predict's
    return await service.batcher.call(_explain, service.classifier, name, data, target, format)


def _explain(
    classifier: Classifier, name: str, data: bytes, target: str | None, format: str
) -> Response:
    """One upload's class activation map (``Classifier.explain``) as a PNG overlay or JSON."""
    try:
        image = open_image(data)
        check_pixels(image, name)
        (explanation,) = classifier.explain([image], target)
    except ImageError as error:
        return error_response(status_of(error), str(error))
    except ExplainError as error:
        return error_response(501, str(error))
    except ValueError as error:  # an unknown target class
        return error_response(422, str(error))
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
