"""Letting a request in: its query parameters, the service's readiness and queue, its body read
into images, and the images' limits, each step raising ``Refused`` before anything is decoded.
One dependency per endpoint (``admission``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile

from densenet.serve.config import ServeConfig
from densenet.serve.responses import Refused
from densenet.serve.schemas import IMAGE_FIELD
from densenet.serve.service import Service


def service_of(request: Request) -> Service:
    """The service of the application answering ``request``."""
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
    return min(topk, len(service_of(request).classifier.categories))


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
        service = service_of(request)
        service.check_open()
        images = await _read_images(request, service.config)
        if one_image and len(images) != 1:
            raise Refused(422, f"explain takes one image, got {len(images)}")
        return Admitted(params, images, service.admit(images), start)

    return admit


PredictAdmitted = Annotated[Admitted, Depends(admission(_topk))]
ExplainAdmitted = Annotated[Admitted, Depends(admission(_explain_query, one_image=True))]


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
