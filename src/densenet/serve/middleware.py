"""The service's ASGI middleware: request metrics by endpoint and status, the upload limit, and
the answer to a request that the server's shutdown cuts short."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import ClientDisconnect

from densenet.serve.responses import UploadTooLarge, error_response, too_large
from densenet.serve.service import Service

log = logging.getLogger(__name__)

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


class RequestMiddleware:
    """Counts requests by endpoint and status, times them, and refuses bodies over the limit
    (413): at once from Content-Length, or while reading a body sent without one. A client that
    disconnects before its answer is counted as 499; a request still running when the server's
    shutdown grace period ends (the server cancels it) is answered with a JSON 503."""

    def __init__(self, app, service: Service) -> None:
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

        if counted:
            metrics.in_flight.inc()
        try:
            await self._answer(scope, receive, send_wrapper)
        except ClientDisconnect:
            status = CLIENT_CLOSED
            log.info("%s %s: the client disconnected before its answer", scope["method"], endpoint)
        except asyncio.CancelledError:
            # the server cancels what is still running at the end of its shutdown grace period;
            # the answer is the last thing this request does, so the cancellation ends here
            if responded:
                raise
            log.warning("%s %s: cut short by the server's shutdown", scope["method"], endpoint)
            await error_response(503, "the server shut down before this request finished; retry")(
                scope, receive, send_wrapper
            )
        finally:
            if counted:
                metrics.in_flight.dec()
            metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)

    async def _answer(self, scope, receive, send) -> None:
        """The application's answer, or 413 for a body over the limit: at once from
        Content-Length, else ``UploadTooLarge`` raised while the body is read."""
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

        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await too_large(limit)(scope, receive, send)
        else:
            await self.app(scope, receive_wrapper, send)
