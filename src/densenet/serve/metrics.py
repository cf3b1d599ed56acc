"""The service's Prometheus metrics (``prometheus_client``), in a registry of their own so that
several applications in one process do not share counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)  # seconds


class ServiceMetrics:
    """Requests, latency, images, batches and readiness; ``queue_depth`` and
    ``pixels_in_flight`` are read at each scrape."""

    def __init__(
        self, queue_depth: Callable[[], float], pixels_in_flight: Callable[[], float]
    ) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def metric(kind, name: str, help: str, labels: tuple[str, ...] = (), **options):
            return kind(name, help, labels, registry=registry, **options)

        self.requests = metric(
            Counter,
            "densenet_requests",
            "HTTP requests by endpoint and status code",
            ("endpoint", "status"),
        )
        self.latency = metric(
            Histogram,
            "densenet_request_duration_seconds",
            "HTTP request latency, seconds",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = metric(
            Gauge,
            "densenet_requests_in_flight",
            "HTTP requests being answered (excluding /metrics)",
        )
        self.images = metric(Counter, "densenet_images", "images received by outcome", ("outcome",))
        self.batch_size = metric(
            Histogram, "densenet_batch_size", "images per forward pass", buckets=BATCH_BUCKETS
        )
        self.inference = metric(
            Histogram,
            "densenet_inference_seconds",
            "forward pass time per batch, seconds",
            buckets=INFERENCE_BUCKETS,
        )
        self.queue_depth = metric(Gauge, "densenet_queue_depth", "images waiting for a batch")
        self.queue_depth.set_function(queue_depth)
        self.pixels_in_flight = metric(
            Gauge, "densenet_decode_pixels_in_flight", "pixels of the images being decoded"
        )
        self.pixels_in_flight.set_function(pixels_in_flight)
        self.ready = metric(Gauge, "densenet_ready", "1 once the model is loaded and warmed up")

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)
