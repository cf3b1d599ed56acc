"""The service's limits (``ServeConfig``), checked when they are set."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
