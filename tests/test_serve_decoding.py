"""The service's fair decoder: requests served in turn, a request's share of the threads, the
bound on pixels in flight, memory given back after large decodes, pixels read from headers."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from densenet.data.images import MAX_PIXELS
from densenet.serve import decoding
from densenet.serve.decoding import TRIM_PIXELS, FairDecoder, header_pixels


class Jobs:
    """Jobs that record the order they start in; a job named in ``gates`` waits for its gate."""

    def __init__(self, *gated: str) -> None:
        self.started: list[str] = []
        self.gates = {name: threading.Event() for name in gated}
        self.running = {name: threading.Event() for name in gated}

    def __call__(self, name: str) -> str:
        self.started.append(name)
        if name in self.gates:
            self.running[name].set()
            assert self.gates[name].wait(30), f"the test never opened {name}'s gate"
        return name

    async def wait_running(self, name: str) -> None:
        assert await asyncio.to_thread(self.running[name].wait, 30), f"{name} never started"


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_small_request_is_not_queued_behind_a_large_ones_images():
    """One thread: the large request's first image is decoding when a one-image request comes;
    that image goes next, before the large request's other images."""
    jobs = Jobs("large 0")

    async def scenario():
        decoder = FairDecoder(workers=1, max_pixels=100, per_request=1)
        large = asyncio.create_task(decoder.map(jobs, [((f"large {i}",), 1) for i in range(3)]))
        await jobs.wait_running("large 0")
        small = asyncio.create_task(decoder.map(jobs, [(("small",), 1)]))
        await asyncio.sleep(0)  # the small request is queued
        jobs.gates["large 0"].set()
        assert await small == ["small"]
        assert await large == ["large 0", "large 1", "large 2"]
        decoder.shutdown()

    run(scenario)
    assert jobs.started == ["large 0", "small", "large 1", "large 2"]


def test_a_request_holds_at_most_its_share_of_the_threads():
    """Two threads, one per request: while the large request's image blocks its thread, a small
    request is decoded on the other, and the large request's second image does not take it."""
    jobs = Jobs("large 0")

    async def scenario():
        decoder = FairDecoder(workers=2, max_pixels=100, per_request=1)
        large = asyncio.create_task(decoder.map(jobs, [((f"large {i}",), 1) for i in range(2)]))
        await jobs.wait_running("large 0")
        assert await decoder.map(jobs, [(("small",), 1)]) == ["small"]  # while large 0 blocks
        jobs.gates["large 0"].set()
        assert await large == ["large 0", "large 1"]
        decoder.shutdown()

    run(scenario)
    assert jobs.started == ["large 0", "small", "large 1"]


def test_pixels_in_flight_are_bounded():
    """Two images of 6 pixels under a bound of 10: the second starts only when the first is done,
    even with threads idle; a request cannot declare more than the bound."""
    jobs = Jobs("a")

    async def scenario():
        decoder = FairDecoder(workers=2, max_pixels=10, per_request=2)
        both = asyncio.create_task(decoder.map(jobs, [(("a",), 6), (("b",), 6)]))
        await jobs.wait_running("a")
        assert jobs.started == ["a"] and decoder.pixels_in_flight == 6
        jobs.gates["a"].set()
        assert await both == ["a", "b"]
        assert decoder.pixels_in_flight == 0
        with pytest.raises(ValueError, match="max_pixels"):
            await decoder.map(jobs, [(("c",), 11)])
        decoder.shutdown()

    run(scenario)


def test_a_failing_job_fails_its_own_result_only():
    def job(x: int) -> int:
        if x < 0:
            raise RuntimeError("decoder crashed")
        return x

    async def scenario():
        decoder = FairDecoder(workers=2, max_pixels=10, per_request=2)
        with pytest.raises(RuntimeError, match="decoder crashed"):
            await decoder.map(job, [((1,), 1), ((-1,), 1)])
        assert await decoder.map(job, [((2,), 1)]) == [2]  # the pool and its counts are intact
        assert decoder.pixels_in_flight == 0
        decoder.shutdown()

    run(scenario)


def test_memory_is_given_back_after_large_decodes_only(monkeypatch):
    trims = []
    monkeypatch.setattr(decoding, "release_memory", lambda: trims.append(1))

    async def scenario():
        decoder = FairDecoder(workers=1, max_pixels=TRIM_PIXELS, per_request=1)
        await decoder.map(str, [((1,), TRIM_PIXELS - 1)])
        assert trims == []
        await decoder.map(str, [((1,), TRIM_PIXELS)])
        assert trims == [1]
        decoder.shutdown()

    run(scenario)


def test_header_pixels_reads_the_header_only():
    buffer = io.BytesIO()
    Image.new("L", (300, 200)).save(buffer, "PNG")
    png = buffer.getvalue()
    assert header_pixels(png, ["PNG"]) == 60_000
    # what the decoder refuses from the header counts nothing: it never allocates those pixels
    assert header_pixels(png, ["JPEG"]) == 0
    assert header_pixels(png[:20], ["PNG"]) == 0
    assert header_pixels(b"not an image", ["PNG"]) == 0
    side = int(MAX_PIXELS**0.5) + 1
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG")
    with pytest.warns(Image.DecompressionBombWarning):
        assert header_pixels(buffer.getvalue(), ["PNG"]) == 0
