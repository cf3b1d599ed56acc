"""What the endpoints share (``Service``): the classifier, the batcher, the decoder and the
metrics; readiness and its warm-up, the request limits, and the classification of admitted
images."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from PIL import Image
from torch import Tensor

from densenet.data.images import RASTER_FORMATS, ImageError, Reason, open_image
from densenet.data.transforms import CHANNEL_MODES
from densenet.serve.batcher import Batcher, BatchResult, QueueFull
from densenet.serve.config import WARM_UP_SIDE, ServeConfig
from densenet.serve.decoding import FairDecoder, header_pixels
from densenet.serve.metrics import ServiceMetrics
from densenet.serve.responses import Refused, error_response, status_of
from densenet.tasks.predict import Classifier, Prediction, top_predictions

log = logging.getLogger(__name__)


class Service:
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
        except Exception as error:  # a decoder failing in an unforeseen way: the image's fault
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
            return error_response(503, str(error))
        predictions, queue_s, inference_s = [], 0.0, 0.0
        for (source, _), x in zip(images, inputs):
            if isinstance(x, ImageError):
                entry = Prediction(source, [], [], [], str(x), x.reason).to_dict()
                predictions.append({**entry, "status": status_of(x)})
                continue
            result = next(results)
            predictions.append(self._answer(source, result, topk))
            if isinstance(result, BatchResult):
                queue_s = max(queue_s, result.queue_s)
                inference_s = max(inference_s, result.inference_s)
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

    def _answer(
        self, source: str, result: BatchResult | BaseException, topk: int
    ) -> dict[str, Any]:
        """A decoded image's entry: its top-k and batch size, or, when the model failed on it
        alone, its error and status."""
        if isinstance(result, BaseException):
            status = 503 if isinstance(result, QueueFull) else 500
            failure = f"{source}: inference failed ({type(result).__name__}: {result})"
            entry = Prediction(source, [], [], [], error=failure).to_dict()
            return {**entry, "status": status}
        card = self.classifier.card
        categories = self.classifier.categories
        (prediction,) = top_predictions([source], result.output[None], topk, categories)
        if card.multi_label:
            (prediction.positive,) = card.positive(result.output[None])
        return {**prediction.to_dict(), "batch_size": result.batch_size}
