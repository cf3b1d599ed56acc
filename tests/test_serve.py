"""The HTTP service (`densenet serve`): every endpoint, every bad input, dynamic batching, the
queue and pixel limits, readiness, metrics, results equal to `densenet predict`, graceful SIGTERM;
on a live server, clients that disconnect or stall and requests cut short by the shutdown."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data
import torch
import uvicorn
from conftest import randomize_batchnorm, tiny_model
from PIL import Image

import densenet
from densenet.cli import build_parser, main
from densenet.data.images import ImageError, Reason
from densenet.serve import Batcher, QueueFull, ServeConfig, create_app
from densenet.serve.responses import status_of

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about its httpx-based client
    from fastapi.testclient import TestClient


def encode(array, fmt: str = "JPEG", **kwargs) -> bytes:
    return encode_image(Image.fromarray(array), fmt, **kwargs)


def encode_image(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Real photographs shipped with scikit-image, as the files a user would upload."""
    return {
        "chelsea.jpg": encode(skimage.data.chelsea()),
        "coffee.png": encode(skimage.data.coffee(), "PNG"),
        "astronaut.jpg": encode(skimage.data.astronaut()),
    }


@pytest.fixture(scope="module")
def classifier() -> densenet.Classifier:
    torch.manual_seed(0)
    return densenet.Classifier(randomize_batchnorm(tiny_model()), device="cpu")


def bomb_png() -> bytes:
    """A small PNG that decodes to 144 million pixels."""
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


BROKEN = {
    "empty": (lambda p: b"", 400, "empty"),
    "text": (lambda p: b"just some text, not a picture", 415, "not an image"),
    "truncated": (lambda p: p["chelsea.jpg"][: len(p["chelsea.jpg"]) // 2], 400, "truncated"),
    "corrupt": (lambda p: p["coffee.png"][:64] + bytes(4096), 400, "corrupt"),
    "bomb": (lambda p: bomb_png(), 400, "pixels"),
    "wide": (lambda p: encode(skimage.data.chelsea()[:2, :300], "PNG"), 400, "wider"),
    # PIL reads EPS through Ghostscript, an interpreter: the service accepts raster formats only
    "eps": (
        lambda p: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n",
        415,
        "not an image",
    ),
}


def wait_ready(client: TestClient, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.02)


@contextmanager
def serving(classifier, **config):
    app = create_app(classifier, ServeConfig(**config), model_name="tiny-densenet")
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(classifier):
    with serving(classifier, max_upload_mb=1, max_images=4) as client:
        yield client


def top(prediction) -> tuple[list[int], list[float]]:
    return [e["index"] for e in prediction["top"]], [e["probability"] for e in prediction["top"]]


def assert_same(served: dict, expected: densenet.tasks.predict.Prediction) -> None:
    indices, probabilities = top(served)
    assert indices == expected.indices
    assert [e["label"] for e in served["top"]] == expected.labels
    assert probabilities == pytest.approx(expected.probabilities, rel=1e-5, abs=1e-7)


# ---- the endpoints ---------------------------------------------------------------------------


def test_health_models_page_and_openapi(client, classifier):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    for probe in ("/healthz", "/readyz"):  # load balancers probe with HEAD
        head = client.head(probe)
        assert (head.status_code, head.content) == (200, b""), probe
    model = client.get("/v1/models").json()["models"][0]
    assert model["num_classes"] == 1000 and model["device"] == "cpu" and model["ready"]
    assert model["parameters"] == sum(p.numel() for p in tiny_model().parameters())
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'type="file"' in html and "v1/predict" in html and "paste" in html
    # self-contained: no CDN, no external font or stylesheet
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "@font-face" not in html
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]


def test_predict_multipart_raw_and_topk(client, classifier, photos):
    expected = classifier.classify([photos["chelsea.jpg"]], topk=5)[0]
    files = [("file", ("chelsea.jpg", photos["chelsea.jpg"], "image/jpeg"))]
    body = client.post("/v1/predict", files=files).json()
    assert body["model"] == "tiny-densenet"
    timing = body["timing"]  # milliseconds: the parts lie within the whole request's time
    assert 0 < timing["inference_ms"] <= timing["total_ms"]
    assert 0 <= timing["preprocess_ms"] + timing["queue_ms"] <= timing["total_ms"]
    (served,) = body["predictions"]
    assert served["source"] == "chelsea.jpg" and served["batch_size"] >= 1
    assert_same(served, expected)
    probabilities = top(served)[1]
    assert probabilities == sorted(probabilities, reverse=True)
    raw = client.post(
        "/v1/predict", content=photos["chelsea.jpg"], headers={"content-type": "image/jpeg"}
    )
    assert_same(raw.json()["predictions"][0], expected)
    three = client.post("/v1/predict?topk=3", content=photos["chelsea.jpg"]).json()
    assert len(three["predictions"][0]["top"]) == 3
    assert top(three["predictions"][0])[0] == expected.indices[:3]


def test_several_images_mixed_good_and_broken_in_one_request(client, classifier, photos):
    names = ["chelsea.jpg", "text", "coffee.png", "empty"]
    data = [photos["chelsea.jpg"], b"not an image", photos["coffee.png"], b""]
    # a client's file name is only echoed: nothing is read from or written to such a path
    files = [("file", (n if n != "coffee.png" else "/etc/passwd", d)) for n, d in zip(names, data)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200
    served = response.json()["predictions"]
    expected = classifier.classify([data[0], data[2]])
    assert_same(served[0], expected[0])
    assert_same(served[2], expected[1])
    assert served[2]["source"] == "/etc/passwd"
    assert served[1]["status"] == 415 and "not an image" in served[1]["error"]
    assert served[3]["status"] == 400 and "empty" in served[3]["error"]


def test_raster_formats_and_modes(classifier):
    camera = skimage.data.camera()  # grayscale
    uploads = {
        "gray16.png": encode((camera.astype("uint16") * 257), "PNG"),
        "cmyk.jpg": encode_image(Image.fromarray(skimage.data.coffee()).convert("CMYK"), "JPEG"),
        "palette.gif": encode_image(Image.fromarray(skimage.data.chelsea()).convert("P"), "GIF"),
        "rgba.webp": encode_image(
            Image.fromarray(skimage.data.astronaut()).convert("RGBA"), "WEBP"
        ),
        "photo.bmp": encode(skimage.data.chelsea(), "BMP"),
        "photo.tiff": encode(skimage.data.coffee(), "TIFF"),
    }
    files = [("file", (name, data)) for name, data in uploads.items()]
    with serving(classifier) as client:
        served = client.post("/v1/predict", files=files).json()["predictions"]
    expected = classifier.classify(list(uploads.values()))
    for got, want in zip(served, expected):
        assert_same(got, want)


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_images_get_4xx_with_a_json_message(client, photos, kind):
    make, status, words = BROKEN[kind]
    for response in (
        client.post("/v1/predict", content=make(photos)),
        client.post("/v1/predict", files=[("file", ("upload.jpg", make(photos)))]),
    ):
        assert response.status_code == status, response.text
        assert words in response.json()["detail"]
    assert client.get("/healthz").status_code == 200  # and the service lives on


def test_status_follows_the_reason_not_the_message(client):
    """415 only for ``Reason.NOT_AN_IMAGE``, whatever the message says; the reason is in the
    answer too."""
    assert (
        status_of(ImageError("x: not an image (unrecognised format)", Reason.NOT_AN_IMAGE)) == 415
    )
    assert status_of(ImageError("not an image.png: corrupt", Reason.CORRUPT)) == 400
    response = client.post("/v1/predict", files=[("file", ("a.txt", b"plain text"))])
    (refused,) = response.json()["predictions"]
    assert (refused["reason"], refused["status"], response.status_code) == (
        "not_an_image",
        415,
        415,
    )


def test_bad_requests(client, photos):
    jpeg = photos["chelsea.jpg"]
    cases = {
        "over the limit (Content-Length)": (dict(content=b"x" * ((1 << 20) + 1)), 413),
        "over the limit (chunked)": (dict(content=iter([b"x" * (1 << 19)] * 3)), 413),
        "over the limit (multipart)": (dict(files=[("file", ("a.jpg", b"x" * (3 << 19)))]), 413),
        "unknown field": (dict(files=[("image", ("a.jpg", jpeg))]), 422),
        "file sent as text": (dict(data={"file": "abc"}, files=[("file", ("a.jpg", jpeg))]), 422),
        "too many files": (dict(files=[("file", (f"{i}.jpg", jpeg)) for i in range(5)]), 400),
        "multipart without boundary": (
            dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
            400,
        ),
        # two complete parts and no closing boundary: refused, not answered for one image
        "unterminated multipart": (
            dict(
                content=b"".join(
                    b'--x\r\nContent-Disposition: form-data; name="file"; filename="%d.jpg"\r\n'
                    b"\r\n%s\r\n" % (i, jpeg)
                    for i in range(2)
                ),
                headers={"content-type": "multipart/form-data; boundary=x"},
            ),
            400,
        ),
    }
    for name, (kwargs, status) in cases.items():
        response = client.post("/v1/predict", **kwargs)
        assert response.status_code == status, (name, response.text)
        assert isinstance(response.json()["detail"], str), name
    for query in ("topk=0", "topk=five", "colour=red"):
        response = client.post(f"/v1/predict?{query}", content=jpeg)
        assert response.status_code == 422, (query, response.text)
        assert response.json()["detail"]


def test_a_two_class_model_answers_default_requests_and_16_bit_images(photos):
    """topk is capped at the class count (the page sends topk=5), as the CLI and bulk cap it;
    a 16-bit grey PNG is scaled by its bit depth, so it classifies as its 8-bit twin."""
    torch.manual_seed(0)
    two = densenet.Classifier(randomize_batchnorm(tiny_model(num_classes=2)), device="cpu")
    grey16 = encode_image(Image.fromarray(np.full((64, 64), 32768, np.uint16)), "PNG")
    grey8 = encode_image(Image.new("L", (64, 64), 128), "PNG")
    with serving(two) as client:
        for url in ("/v1/predict", "/v1/predict?topk=5"):
            response = client.post(url, content=photos["coffee.png"])
            assert response.status_code == 200, response.text
            assert len(response.json()["predictions"][0]["top"]) == 2
        sixteen, eight = (client.post("/v1/predict", content=b).json() for b in (grey16, grey8))
    assert top(sixteen["predictions"][0]) == top(eight["predictions"][0])


def test_metrics(classifier, photos):
    with serving(classifier, max_batch=4) as client:
        for _ in range(3):
            assert client.post("/v1/predict", content=photos["coffee.png"]).status_code == 200
        assert client.post("/v1/predict", content=b"").status_code == 400
        text = client.get("/metrics").text
    assert 'densenet_requests_total{endpoint="/v1/predict",status="200"} 3.0' in text
    assert 'densenet_requests_total{endpoint="/v1/predict",status="400"} 1.0' in text
    assert 'densenet_request_duration_seconds_count{endpoint="/v1/predict"} 4.0' in text
    assert 'densenet_images_total{outcome="error"} 1.0' in text
    assert "densenet_batch_size_count 3.0" in text  # three forward passes of one image
    assert 'densenet_batch_size_bucket{le="1.0"} 3.0' in text
    assert "densenet_queue_depth 0.0" in text and "densenet_ready 1.0" in text
    assert "densenet_decode_pixels_in_flight 0.0" in text


def images_counted(client: TestClient) -> float:
    """Images decoded so far, ok or not, from /metrics."""
    found = re.findall(
        r"^densenet_images_total\{outcome=\"\w+\"\} (\S+)$", client.get("/metrics").text, re.M
    )
    return sum(map(float, found))


def test_request_limits_are_checked_before_decoding(classifier, photos):
    """A request over its pixel budget (summed from the image headers), or with more images than
    the queue could ever hold, gets a 413 saying which limit, and nothing of it is decoded."""
    files = [("file", (f"{i}.jpg", photos["astronaut.jpg"])) for i in range(6)]  # 512x512 each
    with serving(classifier, max_queue=4, max_batch=2, max_request_pixels=600_000) as client:
        decoded = images_counted(client)
        too_many = client.post("/v1/predict", files=files)
        assert too_many.status_code == 413
        assert (
            "6 images" in too_many.json()["detail"] and "--max-queue" in too_many.json()["detail"]
        )
        too_large = client.post("/v1/predict", files=files[:3])
        assert too_large.status_code == 413
        assert "786,432 pixels" in too_large.json()["detail"]
        assert "--max-request-pixels" in too_large.json()["detail"]
        assert images_counted(client) == decoded
        fits = client.post("/v1/predict", files=files[:2])
        assert fits.status_code == 200 and images_counted(client) == decoded + 2


# ---- dynamic batching -------------------------------------------------------------------------


class Gated(torch.nn.Module):
    """A model whose forward passes wait until the test opens the gate."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.gate = threading.Event()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert self.gate.wait(30), "the test never opened the gate"
        return self.model(x)


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_good_and_broken_requests_share_batches(photos):
    """While the model computes one image, the others queue up; they are then gathered into one
    forward pass (no waiting window involved)."""
    torch.manual_seed(0)
    model = Gated(randomize_batchnorm(tiny_model()))
    classifier = densenet.Classifier(model, device="cpu")
    model.gate.set()
    good = list(photos.items())
    bad = [(k, BROKEN[k][0](photos), BROKEN[k][1]) for k in ("empty", "text", "truncated")]
    expected = dict(zip(photos, classifier.classify(list(photos.values()))))
    with serving(classifier, max_batch=8, max_wait_ms=0) as client:
        model.gate.clear()
        calls = model.calls

        def post(data: bytes) -> httpx.Response:
            return client.post("/v1/predict", content=data)

        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(post, good[0][1])
            wait_for(lambda: model.calls == calls + 1)  # in the model, which is blocked
            rest = [pool.submit(post, data) for _, data in good[1:]]
            bad_futures = [pool.submit(post, data) for _, data, _ in bad]
            for (_, _, status), future in zip(bad, bad_futures):  # answered without the model
                assert future.result().status_code == status
            wait_for(lambda: client.app.state.service.batcher.depth == len(rest))
            model.gate.set()
            good_futures = [first, *rest]
            batch_sizes = []
            for (name, _), future in zip(good, good_futures):
                response = future.result()
                assert response.status_code == 200
                assert_same(response.json()["predictions"][0], expected[name])
                batch_sizes.append(response.json()["predictions"][0]["batch_size"])
    assert batch_sizes == [1] + [len(rest)] * len(rest)  # the queued ones in one forward pass


def test_readiness_health_during_inference_and_full_queue(photos):
    model = Gated(tiny_model())
    app = create_app(
        densenet.Classifier(model, device="cpu"), ServeConfig(max_batch=1, max_queue=1)
    )
    jpeg = photos["chelsea.jpg"]
    with TestClient(app) as client:
        wait_for(lambda: model.calls == 1)  # the warm-up batch is running
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        loading = client.post("/v1/predict", content=jpeg)
        assert loading.status_code == 503 and loading.headers["retry-after"]
        model.gate.set()
        wait_ready(client)  # the warm-up ran the model twice (every batch size, one image)
        model.gate.clear()
        calls = model.calls
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/predict", content=jpeg)
            wait_for(lambda: model.calls == calls + 1)  # in the model, which is blocked
            second = pool.submit(client.post, "/v1/predict", content=jpeg)
            wait_for(lambda: app.state.service.batcher.depth == 1)  # waiting in the queue
            # answered while the model is blocked: the event loop never waits for inference
            assert client.get("/healthz").status_code == 200
            assert client.get("/metrics").status_code == 200
            full = client.post("/v1/predict", content=jpeg)
            assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
            assert "queue" in full.json()["detail"]
            model.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200


# ---- the batcher alone -------------------------------------------------------------------------


def test_batcher_batches_in_order_waits_and_bounds_the_queue():
    sizes = []

    def function(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(len(batch))
        return batch.flatten(1).sum(1, keepdim=True)

    async def scenario():
        batcher = Batcher(function, max_batch=4, max_wait_s=0.05, max_queue=6)
        batcher.start()
        inputs = [torch.full((1, 2, 2), float(i)) for i in range(6)]
        futures = batcher.submit(inputs)
        with pytest.raises(QueueFull):
            batcher.submit([inputs[0]])
        results = await asyncio.gather(*futures)
        assert [r.output.item() for r in results] == [4.0 * i for i in range(6)]
        assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2]
        queued = batcher.submit(inputs[:3])
        await batcher.close()  # finishes what is queued
        assert all(f.done() and not f.exception() for f in queued)

    asyncio.run(scenario())
    assert sizes == [4, 2, 3]


def test_a_lone_input_waits_for_company_until_the_batch_is_full():
    """With a long ``max_wait_s`` a lone input is not computed alone: it waits for the next one,
    and the batch runs as soon as it is full (no timer involved)."""
    sizes = []

    def function(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(len(batch))
        return batch.flatten(1)

    async def scenario():
        batcher = Batcher(function, max_batch=2, max_wait_s=3600)
        batcher.start()
        (alone,) = batcher.submit([torch.zeros(2)])
        for _ in range(20):  # let the batcher run: it must keep waiting
            await asyncio.sleep(0)
        assert not alone.done() and sizes == []
        (company,) = batcher.submit([torch.ones(2)])
        results = await asyncio.wait_for(asyncio.gather(alone, company), 30)
        assert [r.batch_size for r in results] == [2, 2]
        await batcher.close()

    asyncio.run(scenario())
    assert sizes == [2]


def test_a_lone_input_runs_at_once_when_nothing_else_is_arriving():
    """An idle service does not hold a lone request back for company that is not coming: the
    batch waits only while ``arriving`` says inputs are on their way (being decoded)."""
    sizes, coming = [], [True]

    def function(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(len(batch))
        return batch.flatten(1)

    async def scenario():
        batcher = Batcher(function, max_batch=2, max_wait_s=3600, arriving=lambda: coming[0])
        batcher.start()
        (first,) = batcher.submit([torch.zeros(2)])
        for _ in range(20):  # another request is being decoded: the batch waits for it
            await asyncio.sleep(0)
        assert not first.done()
        (second,) = batcher.submit([torch.ones(2)])
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        coming[0] = False
        (alone,) = batcher.submit([torch.ones(2)])
        assert (await asyncio.wait_for(alone, 30)).batch_size == 1
        await batcher.close()

    asyncio.run(scenario())
    assert sizes == [2, 1]


def test_a_failing_input_does_not_fail_the_rest_of_its_batch():
    def function(batch: torch.Tensor) -> torch.Tensor:
        if batch.isnan().any():
            raise RuntimeError("model failed")
        return batch.flatten(1)

    async def scenario():
        batcher = Batcher(function, max_batch=3, max_wait_s=0.0)
        batcher.start()
        good, failing, other = batcher.submit(
            [torch.ones(2), torch.full((2,), float("nan")), torch.zeros(2)]
        )
        with pytest.raises(RuntimeError, match="model failed"):
            await failing
        assert (await good).output.tolist() == [1.0, 1.0]
        assert (await other).output.tolist() == [0.0, 0.0]
        await batcher.close()

    asyncio.run(scenario())


class FailsOnBrightImages(torch.nn.Module):
    """A model that raises for an image whose normalised mean is high (a white picture)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.mean(dim=(1, 2, 3)) > 1.5).any():
            raise RuntimeError("model failed")
        return self.model(x)


def test_a_model_failure_is_a_json_error_for_that_image_only(photos):
    fragile = FailsOnBrightImages(randomize_batchnorm(tiny_model()).eval())
    classifier = densenet.Classifier(fragile, device="cpu", optimize=False)
    white = encode_image(Image.new("RGB", (64, 64), "white"), "PNG")
    with serving(classifier) as client:
        files = [("file", ("photo.jpg", photos["chelsea.jpg"])), ("file", ("white.png", white))]
        response = client.post("/v1/predict", files=files)
        assert response.status_code == 200
        good, failed = response.json()["predictions"]
        assert len(good["top"]) == 5 and "error" not in good
        assert failed["status"] == 500 and "inference failed" in failed["error"]
        alone = client.post("/v1/predict", files=[("file", ("white.png", white))])
        assert alone.status_code == 500 and "model failed" in alone.json()["detail"]


def test_a_model_whose_output_turns_non_finite_is_a_json_500_naming_it(photos):
    model = randomize_batchnorm(tiny_model(num_classes=5)).eval()
    classifier = densenet.Classifier(model, device="cpu", optimize=False)  # runs ``model``
    with serving(classifier) as client:
        model.features.norm5.running_var.fill_(-1.0)  # every output NaN from now on
        jpeg = photos["chelsea.jpg"]
        for answer in (
            client.post("/v1/predict", content=jpeg),
            client.post("/v1/explain", content=jpeg),
            client.post("/v1/explain?format=json", content=jpeg),
        ):
            assert answer.status_code == 500, answer.request.url
            assert "produced non-finite output" in answer.json()["detail"]


@pytest.mark.parametrize("optimize", [True, False])
def test_a_model_whose_warm_up_output_is_non_finite_never_becomes_ready(photos, optimize):
    model = randomize_batchnorm(tiny_model(num_classes=5)).eval()
    model.features.norm5.running_var.fill_(-1.0)  # NaN, folded into the inference form too
    app = create_app(densenet.Classifier(model, device="cpu", optimize=optimize))
    with TestClient(app) as client:
        wait_for(lambda: app.state.service.failure is not None)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "produced non-finite output" in ready.json()["detail"]
        refused = client.post("/v1/predict", content=photos["chelsea.jpg"])
        assert refused.status_code == 503 and "failed its warm-up" in refused.json()["detail"]
        assert "retry-after" not in refused.headers and "retry-after" not in ready.headers
        assert not client.get("/v1/models").json()["models"][0]["ready"]


def test_routes_live_at_module_level_and_admission_refuses_by_raising(classifier, photos):
    """One router serves every app, each reaching its own service; admission is one dependency
    that raises: the query is checked first, then readiness (no lifespan here: never ready)."""
    from densenet.serve.middleware import ENDPOINTS
    from densenet.serve.responses import Refused
    from densenet.serve.routes import router

    assert {route.path for route in router.routes} == set(ENDPOINTS) - {"/openapi.json"}
    jpeg = photos["chelsea.jpg"]
    for name in ("first", "second"):
        client = TestClient(create_app(classifier, model_name=name))
        assert client.get("/v1/models").json()["models"][0]["name"] == name
        assert client.post("/v1/predict?topk=0", content=jpeg).status_code == 422
        unknown = client.post("/v1/explain?colour=red", content=jpeg)
        assert unknown.status_code == 422 and "'colour'" in unknown.json()["detail"]
        loading = client.post("/v1/predict", content=jpeg)
        assert loading.json() == {"detail": "the model is loading; retry shortly"}
        assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
        with pytest.raises(Refused) as refused:
            client.app.state.service.check_open()
        assert refused.value.status == 503


def test_parameters_are_the_models_weights_in_every_form():
    model = randomize_batchnorm(tiny_model(num_classes=5)).eval()
    expected = sum(p.numel() for p in model.parameters())
    for optimize in (True, False):  # the inference form holds its folded weights as buffers
        classifier = densenet.Classifier(model, device="cpu", optimize=optimize)
        with TestClient(create_app(classifier)) as client:
            assert client.get("/v1/models").json()["models"][0]["parameters"] == expected


def test_no_install_hint_names_the_unrelated_densenet_distribution():
    """``densenet`` on PyPI is another package: hints name ``densenet-toolkit[...]``."""
    root = Path(__file__).parents[1]
    files = [root / "README.md", *sorted((root / "src").rglob("*.py"))]
    offending = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"(?<![\w.-])densenet\[", line)
    ]
    assert not offending, "\n".join(offending)


# ---- the command line: same results as `densenet predict`, graceful SIGTERM -------------------


def test_same_results_as_densenet_predict(weights_file, photos, tmp_path, capsys):
    paths = []
    for name, data in photos.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    assert (
        main(["predict", *paths, "--weights", str(weights_file), "--device", "cpu", "--json"]) == 0
    )
    expected = json.loads(capsys.readouterr().out)
    app_classifier = densenet.Classifier("densenet121", str(weights_file), "cpu")
    with TestClient(create_app(app_classifier, weights={"file": weights_file.name})) as client:
        wait_ready(client)
        files = [("file", (os.path.basename(p), Path(p).read_bytes())) for p in paths]
        served = client.post("/v1/predict", files=files).json()
        model = client.get("/v1/models").json()["models"][0]
    assert served["model"] == model["name"] == "densenet121"
    assert model["weights"] == {"file": weights_file.name}
    for got, want in zip(served["predictions"], expected):
        assert [e["index"] for e in got["top"]] == [e["index"] for e in want["top"]]
        assert [e["label"] for e in got["top"]] == [e["label"] for e in want["top"]]
        for a, b in zip(got["top"], want["top"]):
            assert a["probability"] == pytest.approx(b["probability"], rel=1e-5, abs=1e-7)


def test_cli_defaults_are_the_configs():
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.host, defaults.port, defaults.device) == ("127.0.0.1", 8000, "auto")
    config = ServeConfig()
    for name in (
        "max_batch", "max_wait_ms", "max_upload_mb", "max_queue", "max_request_pixels",
        "max_pixels_in_flight", "body_timeout_s",
    ):  # fmt: skip
        assert getattr(defaults, name) == getattr(config, name), name


def test_config_refuses_limits_that_could_never_be_met():
    with pytest.raises(ValueError, match="max_pixels_in_flight"):
        ServeConfig(max_request_pixels=100_000, max_pixels_in_flight=90_000)
    with pytest.raises(ValueError, match="body_timeout_s"):
        ServeConfig(body_timeout_s=0)
    with pytest.raises(ValueError, match="at least 65,536, the 256x256 warm-up image"):
        ServeConfig(max_request_pixels=6000, max_pixels_in_flight=6000)
    for name in ("max_wait_ms", "max_upload_mb", "body_timeout_s"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                ServeConfig(**{name: value})


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight(weights_file, photos, tmp_path):
    command = [sys.executable, "-m", "densenet", "serve", "--weights", str(weights_file)]
    command += ["--port", "0", "--device", "cpu", "--max-batch", "2"]  # the system picks a port
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    bound = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
    try:
        wait_for(lambda: server.poll() is not None or bound.search(log_path.read_text()), 90)
        assert server.poll() is None, log_path.read_text()
        port = bound.search(log_path.read_text()).group(1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            wait_for(lambda: http.get("/readyz").status_code == 200, 90)
            weights = http.get("/v1/models").json()["models"][0]["weights"]
            assert weights["file"] == weights_file.name and len(weights["sha256"]) == 64
            files = [("file", (f"{i}.jpg", photos["astronaut.jpg"])) for i in range(4)]
            in_flight = re.compile(r"^densenet_requests_in_flight (\d+)", re.M)
            with ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(http.post, "/v1/predict", files=files) for _ in range(3)]
                wait_for(lambda: in_flight.search(http.get("/metrics").text).group(1) == "3", 30)
                server.send_signal(signal.SIGTERM)
                responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(len(r.json()["predictions"]) == 4 for r in responses)
        assert server.wait(60) in (0, -signal.SIGTERM)
        log = log_path.read_text()
        # the answers were sent after the shutdown began: they were in flight at SIGTERM
        assert log.index("Shutting down") < log.rindex('"POST /v1/predict HTTP/1.1" 200')
        assert "Application shutdown complete" in log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_explain_returns_the_overlay_png_or_the_map_and_the_same_errors(client, classifier, photos):
    body = photos["chelsea.jpg"]
    png = client.post("/v1/explain", content=body)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    size = classifier.preprocessing.crop_size
    assert Image.open(io.BytesIO(png.content)).size == (size, size)
    answer = client.post("/v1/explain?format=json", content=body).json()
    [expected] = classifier.explain([Image.open(io.BytesIO(body))])
    assert answer["label"] == expected.label
    assert torch.tensor(answer["cam"]).shape == (size, size)
    torch.testing.assert_close(torch.tensor(answer["cam"]), expected.cam, rtol=1e-4, atol=1e-4)
    other = classifier.categories[-1]
    assert (
        client.post(f"/v1/explain?format=json&target={other}", content=body).json()["label"]
        == other
    )
    assert client.post("/v1/explain?target=nothing", content=body).status_code == 422
    text = client.post("/v1/explain", content=b"just some text, not a picture")
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    two = [("file", ("a.jpg", body)), ("file", ("b.jpg", body))]
    assert client.post("/v1/explain", files=two).status_code == 422
    bomb = bomb_png()  # the same limits as /v1/predict, before decoding
    refused = client.post("/v1/explain", content=bomb)
    assert refused.status_code == client.post("/v1/predict", content=bomb).status_code >= 400


def test_a_one_channel_model_is_served(photos):
    grey = densenet.Classifier(randomize_batchnorm(tiny_model(in_channels=1)), device="cpu")
    with serving(grey) as client:  # ready: the warm-up image had one channel
        buffer = io.BytesIO()
        Image.open(io.BytesIO(photos["chelsea.jpg"])).convert("L").save(buffer, "PNG")
        answer = client.post("/v1/predict", content=buffer.getvalue())
        assert answer.status_code == 200
        assert_same(answer.json()["predictions"][0], grey.classify([buffer.getvalue()])[0])


# ---- a live server: clients that disconnect or stall, requests cut short by the shutdown -------


@contextmanager
def live_server(app, **config):
    """``app`` on uvicorn in a thread, on a free loopback port; yields (server, port) once the
    model is ready."""
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_config=None, **config))
    thread = threading.Thread(target=server.run, name="uvicorn")
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60)
        assert server.started, "the server did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_for(lambda: http.get("/readyz").status_code == 200, 30)
        yield server, port
    finally:
        server.should_exit = True
        thread.join(60)


def start_upload(port: int, declared: int, sent: bytes) -> socket.socket:
    """A connection that declares a body of ``declared`` bytes and sends only ``sent``."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (declared, sent)
    )
    return connection


def test_a_client_disconnecting_mid_upload_is_counted_499_and_logged_at_info(
    classifier, photos, caplog
):
    jpeg = photos["chelsea.jpg"]
    app = create_app(classifier, ServeConfig())
    with caplog.at_level(logging.INFO, logger="densenet"), live_server(app) as (_, port):
        start_upload(port, len(jpeg), jpeg[:1000]).close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            counted = 'densenet_requests_total{endpoint="/v1/predict",status="499"} 1.0'
            wait_for(lambda: counted in http.get("/metrics").text)
            assert 'status="500"' not in http.get("/metrics").text
    (record,) = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert record.levelno == logging.INFO and record.exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def read_response(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_stalled_upload_gets_408_and_its_connection_is_closed(classifier, photos):
    jpeg = photos["chelsea.jpg"]
    app = create_app(classifier, ServeConfig(body_timeout_s=0.2))
    with live_server(app) as (_, port):
        # the client sends part of its body, then nothing: the server answers and hangs up
        response = read_response(start_upload(port, len(jpeg), jpeg[:1000]))
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), response[:200]
        assert "did not arrive within 0.2 s" in json.loads(body)["detail"]
        assert b"connection: close" in head.lower()


def test_a_request_cut_short_by_the_shutdown_gets_a_json_503(photos):
    model = Gated(tiny_model())
    app = create_app(densenet.Classifier(model, device="cpu"), ServeConfig())
    model.gate.set()
    with live_server(app, timeout_graceful_shutdown=0.1) as (server, port):
        model.gate.clear()
        calls = model.calls
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        with http, ThreadPoolExecutor(1) as pool:
            future = pool.submit(http.post, "/v1/predict", content=photos["chelsea.jpg"])
            wait_for(lambda: model.calls == calls + 1)  # in the model, which is blocked
            server.should_exit = True  # the request outlives the grace period: cancelled
            response = future.result()
        model.gate.set()  # lets the batcher finish, so the server can stop
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "shut down" in response.json()["detail"]


def test_explain_runs_the_network_in_the_model_thread(client, classifier, photos, monkeypatch):
    body = photos["chelsea.jpg"]
    threads = []
    original = type(classifier).explain

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(classifier), "explain", recording)
    assert client.post("/v1/explain?format=json", content=body).status_code == 200
    assert len(threads) == 1 and threads[0].startswith("densenet-model")


def test_a_service_that_cannot_warm_up_stops_with_the_reason(monkeypatch):
    """Not up and unready for good: the server stops and serve() raises, naming the failure."""
    from densenet.errors import DenseNetError
    from densenet.serve import serve

    classifier = densenet.Classifier(tiny_model().eval(), device="cpu", optimize=False)

    def broken() -> None:
        raise RuntimeError("out of memory while compiling")

    monkeypatch.setattr(classifier, "warm_up", broken)
    logger = logging.getLogger("densenet")  # serve() configures it, as a server process does
    saved = (logger.level, logger.handlers[:], logger.propagate)
    try:
        with pytest.raises(DenseNetError, match="could not warm up .*out of memory while comp"):
            serve(classifier, port=0, log_level="error")
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]


def conforms(spec: dict, path: str, method: str, response) -> None:
    """``response`` is documented by the OpenAPI ``spec`` for ``method path``: its status, its
    content type and (JSON) its body against the schema of that status."""
    import jsonschema

    answers = spec["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in answers, f"{method.upper()} {path} answered {status}, not documented"
    content_type = response.headers["content-type"].split(";")[0]
    documented = answers[status].get("content", {})
    assert content_type in documented, f"{path} {status}: {content_type} not in {list(documented)}"
    if content_type == "application/json":
        schema = {**documented[content_type]["schema"], "components": spec["components"]}
        jsonschema.validate(response.json(), schema)


def test_openapi_documents_every_answer_of_every_route(photos):
    """Each route's answers, good and bad, as the OpenAPI document describes them; a multi-label
    model's predictions carry their positive labels, in the schema too."""
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=3)).eval()
    card = densenet.ModelCard.for_model(model, classes=("cat", "dog", "tree"), multi_label=True)
    classifier = densenet.Classifier(model, device="cpu")
    classifier.card = card
    photo = {"file": ("chelsea.jpg", photos["chelsea.jpg"])}
    text = {"file": ("notes.png", b"not an image at all")}
    with serving(classifier, max_upload_mb=1, max_images=4) as client:
        spec = client.get("/openapi.json").json()
        answers = [
            ("/healthz", "get", client.get("/healthz")),
            ("/readyz", "get", client.get("/readyz")),
            ("/v1/models", "get", client.get("/v1/models")),
            ("/v1/predict", "post", client.post("/v1/predict", files=photo)),
            ("/v1/predict", "post", client.post("/v1/predict?topk=2&x=1", files=photo)),
            ("/v1/predict", "post", client.post("/v1/predict", files=text)),
            ("/v1/predict", "post", client.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n")),
            ("/v1/predict", "post", client.post("/v1/predict", content=b"x" * 2_000_000)),
            ("/v1/explain", "post", client.post("/v1/explain", files=photo)),
            ("/v1/explain", "post", client.post("/v1/explain?format=json", files=photo)),
            ("/v1/explain", "post", client.post("/v1/explain?target=oak", files=photo)),
            ("/v1/explain", "post", client.post("/v1/explain?colour=red", files=photo)),
            ("/v1/explain", "post", client.post("/v1/explain", files=text)),
        ]
    statuses = {(path, r.status_code) for path, _, r in answers}
    assert {("/v1/predict", 200), ("/v1/predict", 415), ("/v1/predict", 413),
            ("/v1/explain", 200), ("/v1/explain", 422), ("/v1/explain", 415)} <= statuses  # fmt: skip
    for path, method, response in answers:
        conforms(spec, path, method, response)
    explained = answers[8][2]
    assert explained.headers["content-type"] == "image/png"
    assert "colour" in answers[11][2].json()["detail"]
    [prediction] = answers[3][2].json()["predictions"]
    assert set(prediction["positive"]) <= {"cat", "dog", "tree"}
    assert "positive" in spec["components"]["schemas"]["ImageResult"]["properties"]
