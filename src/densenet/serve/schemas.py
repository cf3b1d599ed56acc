"""The service's request and response schemas, as its OpenAPI document shows them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

IMAGE_FIELD = "file"  # the multipart field of the images


class TopEntry(BaseModel):
    label: str
    index: int
    probability: float


class ImageResult(BaseModel):
    source: str
    top: list[TopEntry] | None = None
    positive: list[str] | None = None  # a multi-label model: the labels at their thresholds
    batch_size: int | None = None
    error: str | None = None
    reason: str | None = None  # densenet.data.images.Reason of an image that was refused
    status: int | None = None


class Timing(BaseModel):
    total_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float


class PredictResponse(BaseModel):
    model: str
    predictions: list[ImageResult]
    timing: Timing


class ErrorResponse(BaseModel):
    detail: str


class ExplainResponse(BaseModel):
    source: str
    label: str
    index: int
    probability: float
    cam: list[list[float]]  # (H, W) on the network's input grid


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "corrupt, truncated, empty or too many pixels",
        408: "the body did not arrive within --body-timeout-s",
        413: "body over --max-upload-mb, images over --max-request-pixels, or more images "
        "than --max-queue",
        415: "not an image",
        422: "unknown field or parameter, no image, or bad topk",
        500: "the model failed on every image of the request",
        503: "not ready yet, the queue is full, or the server shut down (see Retry-After)",
    }.items()
}

EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ExplainResponse,
        "description": "the overlay PNG (format=png, the default), or the map as JSON "
        "(format=json)",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERRORS,
    422: {"model": ErrorResponse, "description": "unknown parameter or class, not one image"},
    501: {"model": ErrorResponse, "description": "this model form has no class activation map"},
}

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        IMAGE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or several images",
                        }
                    },
                    "required": [IMAGE_FIELD],
                    "additionalProperties": False,
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
