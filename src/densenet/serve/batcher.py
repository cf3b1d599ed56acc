"""Dynamic batching: images from concurrent requests wait in one queue and are gathered into
batches of up to ``max_batch``, waiting at most ``max_wait_s`` after the oldest one arrived.

The model runs in a single worker thread, so the event loop keeps serving (uploads, health
checks, metrics) during inference, and the next batch gathers while the current one runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue cannot take the request's images now; retry later."""


@dataclass(frozen=True)
class BatchResult:
    """The model's output row for one image and how it was computed."""

    output: Tensor  # (num_classes,) the model function's row for this image
    batch_size: int  # images in the forward pass that computed it
    queue_s: float  # seconds from submission to the start of that forward pass
    inference_s: float  # seconds the forward pass took


@dataclass
class _Item:
    input: Tensor
    future: asyncio.Future[BatchResult]
    enqueued: float


class Batcher:
    """Gathers single (C, H, W) inputs into (N, C, H, W) batches for ``function``.

    Args:
        function: (N, C, H, W) -> (N, ...) tensor, run in the worker thread (the model).
        max_batch: most inputs per call of ``function``.
        max_wait_s: longest time the oldest queued input waits for the batch to fill, seconds.
        max_queue: most inputs waiting; ``submit`` raises ``QueueFull`` beyond it.
        on_batch: called with (batch size, seconds) after each forward pass, in the event loop.
        arriving: whether more inputs are on their way (requests being decoded); a batch waits
            for company only while they are, so a lone request on an idle service runs at once.
            None: it always waits up to ``max_wait_s``.
    """

    def __init__(
        self,
        function: Callable[[Tensor], Tensor],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        arriving: Callable[[], bool] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"max_batch ({max_batch}) and max_queue ({max_queue}) must be at least 1 and "
                f"max_wait_s ({max_wait_s}) at least 0"
            )
        self.function = function
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.arriving = arriving or (lambda: True)
        self._queue: deque[_Item] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch (not counting the batch being computed)."""
        return len(self._queue)

    def start(self) -> None:
        """Start gathering batches (again after ``close``); call from the running event loop."""
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="densenet-model")
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="densenet-batcher")

    def submit(self, inputs: Sequence[Tensor]) -> list[asyncio.Future[BatchResult]]:
        """Queue ``inputs`` (each (C, H, W)) all or none; one future per input, in order.
        Raises ``QueueFull`` when they do not fit, ``RuntimeError`` when closed."""
        if self._task is None or self._arrived is None or self._closing:
            raise RuntimeError(
                "the batcher is not running (start() it; it is closed after close())"
            )
        if len(self._queue) + len(inputs) > self.max_queue:
            raise QueueFull(
                f"{len(self._queue)} images are queued, {len(inputs)} more would exceed the "
                f"limit of {self.max_queue}; retry shortly"
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(x, loop.create_future(), now) for x in inputs]
        self._queue.extend(items)
        self._arrived.set()
        return [item.future for item in items]

    async def run_once(self, batch: Tensor) -> Tensor:
        """``function(batch)`` in the worker thread, outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.function, batch
        )

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the model's worker thread, between batches (a request that
        runs the network another way, such as a class activation map)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def close(self) -> None:
        """Finish every queued input, then stop the worker."""
        self._closing = True
        if self._arrived is not None:
            self._arrived.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].enqueued + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._closing and self.arriving():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            items: list[_Item] = []
            while self._queue and len(items) < self.max_batch:
                item = self._queue.popleft()
                if not item.future.done():  # a cancelled request's images are dropped
                    items.append(item)
            if items:
                await self._execute(items)

    async def _execute(self, items: list[_Item]) -> None:
        """Run the items, one forward pass per input shape, and resolve their futures."""
        groups: dict[tuple[int, ...], list[_Item]] = {}
        for item in items:
            groups.setdefault(tuple(item.input.shape), []).append(item)
        for group in groups.values():
            await self._execute_group(group)

    async def _execute_group(self, group: list[_Item]) -> None:
        """One forward pass. If it fails, each input is retried alone, so only the inputs that
        fail by themselves get the error and the rest of the batch is answered."""
        start = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._forward, [item.input for item in group]
            )
        except Exception as error:
            if len(group) > 1:
                log.warning(
                    "inference failed on a batch of %d (%s); retrying one by one", len(group), error
                )
                for item in group:
                    await self._execute_group([item])
                return
            log.exception("inference failed")
            if not group[0].future.done():
                group[0].future.set_exception(error)
            return
        elapsed = time.perf_counter() - start
        for item, row in zip(group, outputs):
            if not item.future.done():
                item.future.set_result(BatchResult(row, len(group), start - item.enqueued, elapsed))
        if self.on_batch is not None:
            self.on_batch(len(group), elapsed)

    def _forward(self, inputs: list[Tensor]) -> Tensor:
        return self.function(torch.stack(inputs))
