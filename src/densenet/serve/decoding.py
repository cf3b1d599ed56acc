"""Fair decoding for the service: each request's images wait in a queue of their own, and the
thread pool takes them from the requests in turn, so a small request is never queued behind a
large one's images; a request holds at most ``per_request`` threads at once, and the pixels being
decoded are bounded (their sum over the jobs running never passes ``max_pixels``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import io
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from densenet.data.images import MAX_PIXELS

log = logging.getLogger(__name__)

# Decodes of at least this many pixels give their memory back to the system when done.
TRIM_PIXELS = 4_000_000


def header_pixels(data: bytes, formats: Sequence[str]) -> int:
    """Width x height from the image's header (nothing is decoded); 0 when the header cannot be
    read or declares over ``MAX_PIXELS``: the decoder refuses such an image from its header too,
    without allocating its pixels, and names the problem."""
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            pixels = image.width * image.height
    except Exception:  # any unreadable header: the decoder names the problem
        return 0
    return pixels if pixels <= MAX_PIXELS else 0


def _malloc_trim() -> Callable[[], Any] | None:
    """glibc's ``malloc_trim(0)``, which returns the free memory of every heap to the system,
    or None where the C library has no such function."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc only; elsewhere nothing to do)."""
    if _TRIM is not None:
        _TRIM(0)


@dataclass
class _Request:
    jobs: deque[tuple[Callable[[], Any], int, asyncio.Future]] = field(default_factory=deque)
    running: int = 0


class FairDecoder:
    """A thread pool whose jobs are taken from the waiting requests round-robin.

    Args:
        workers: threads.
        max_pixels: most pixels decoded at once, over all jobs running; each job must declare
            at most this many.
        per_request: most threads one request holds at once.
    """

    def __init__(self, workers: int, max_pixels: int, per_request: int) -> None:
        if min(workers, max_pixels, per_request) < 1:
            raise ValueError(
                f"workers ({workers}), max_pixels ({max_pixels}) and per_request ({per_request}) "
                "must be at least 1"
            )
        self.max_pixels = max_pixels
        self.per_request = per_request
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="densenet-decode")
        self._idle = workers
        self._free_pixels = max_pixels
        self._requests: OrderedDict[int, _Request] = OrderedDict()
        self._ids = itertools.count()

    @property
    def pixels_in_flight(self) -> int:
        return self.max_pixels - self._free_pixels

    @property
    def requests_in_flight(self) -> int:
        """Requests whose images are being decoded or wait for a thread."""
        return len(self._requests)

    async def map(self, function: Callable[..., Any], jobs: Sequence[tuple[tuple, int]]) -> list:
        """``function(*args)`` for each (args, pixels) of one request, in the pool; the results
        in order. A job's ``pixels`` count against ``max_pixels`` while it runs."""
        if any(pixels > self.max_pixels for _, pixels in jobs):
            raise ValueError(f"a job declares more than max_pixels ({self.max_pixels:,})")
        loop = asyncio.get_running_loop()
        key, request = next(self._ids), _Request()
        futures = []
        for args, pixels in jobs:
            futures.append(loop.create_future())
            request.jobs.append((lambda a=args: function(*a), pixels, futures[-1]))
        self._requests[key] = request
        self._requests.move_to_end(key, last=False)  # served nothing yet: first in turn
        self._dispatch()
        try:
            return list(await asyncio.gather(*futures))
        finally:  # a cancelled request's waiting jobs are dropped
            request.jobs.clear()
            self._requests.pop(key, None)

    def shutdown(self) -> None:
        """Wait for the running jobs, then stop the threads."""
        self._pool.shutdown(wait=True)

    def _dispatch(self) -> None:
        """Start jobs while threads are idle, from each request in turn (a new request first,
        then the one served longest ago), skipping those at ``per_request``; stop at a job whose
        pixels do not fit now, so that a large image waits for memory without being overtaken
        forever."""
        while self._idle:
            key = next(
                (k for k, r in self._requests.items() if r.jobs and r.running < self.per_request),
                None,
            )
            if key is None:
                return
            request = self._requests[key]
            run, pixels, future = request.jobs[0]
            if pixels > self._free_pixels:
                return
            request.jobs.popleft()
            self._requests.move_to_end(key)  # its next job waits for the other requests' turn
            self._idle -= 1
            self._free_pixels -= pixels
            request.running += 1
            done = asyncio.get_running_loop().run_in_executor(self._pool, _run, run, pixels)
            done.add_done_callback(lambda d, r=request, p=pixels, f=future: self._done(r, p, f, d))

    def _done(self, request: _Request, pixels: int, future: asyncio.Future, done) -> None:
        self._idle += 1
        self._free_pixels += pixels
        request.running -= 1
        if not future.done():
            if done.cancelled():
                future.cancel()
            elif done.exception() is not None:
                future.set_exception(done.exception())
            else:
                future.set_result(done.result())
        self._dispatch()


def _run(run: Callable[[], Any], pixels: int) -> Any:
    """One job in a pool thread; after a large decode its freed memory goes back to the system."""
    try:
        return run()
    finally:
        if pixels >= TRIM_PIXELS:
            release_memory()
