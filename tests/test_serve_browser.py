"""The web page in a real browser: headless Chromium (Debian's package, driven by Playwright)
loads it from a server on 127.0.0.1, classifies a photograph (chosen, dropped, pasted), shows a
broken file's error, fits a phone-sized screen, and loads nothing from elsewhere. Screenshots are
saved under artifacts/."""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import skimage.data
import torch
import uvicorn
from conftest import randomize_batchnorm, tiny_model
from PIL import Image

import densenet
from densenet.serve import create_app

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"no Chromium at {CHROMIUM} (Debian's chromium package; .ci/run installs it)",
    ),
]


@pytest.fixture(scope="module")
def server():
    """The service with a small random model, on a free port of 127.0.0.1, in a thread."""
    torch.manual_seed(0)
    classifier = densenet.Classifier(randomize_batchnorm(tiny_model()), device="cpu")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    instance = uvicorn.Server(
        uvicorn.Config(create_app(classifier, model_name="tiny-densenet"), log_level="warning")
    )
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    yield url
    instance.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upload")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.jpg", quality=90)
    (folder / "holiday.jpg").write_bytes(b"this is not really a JPEG")
    return folder


def expected_top5(url: str, path: Path) -> list[str]:
    response = httpx.post(url + "/v1/predict", files=[("file", (path.name, path.read_bytes()))])
    return [entry["label"] for entry in response.json()["predictions"][0]["top"]]


def shown_results(page) -> tuple[list[str], list[str]]:
    page.wait_for_selector("#results .result >> nth=4")
    return page.locator("#results .label").all_inner_texts(), page.locator(".pct").all_inner_texts()


def open_chooser_with_enter(page, tries: int = 5):
    """Press Enter on the focused button until the file chooser opens. Headless Chromium now and
    then drops the first chooser after a key press (seen about once in four runs); a few tries
    keep the check that the keyboard opens it without making the test flaky."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(1, tries + 1):
        try:
            with page.expect_file_chooser(timeout=5000) as chooser:
                page.keyboard.press("Enter")
            return chooser.value
        except PlaywrightTimeout:
            if attempt == tries:
                raise


def test_page_in_chromium(server, files):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    photo, broken = files / "astronaut.jpg", files / "holiday.jpg"
    expected = expected_top5(server, photo)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            elsewhere: list[str] = []
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith((server, "blob:", "data:"))
                    else elsewhere.append(r.url)
                ),
            )
            page.goto(server + "/")
            page.wait_for_selector("#model:has-text('tiny-densenet')")

            # keyboard: the first Tab reaches the button that opens the file chooser
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == "choose"
            open_chooser_with_enter(page).set_files(str(photo))
            labels, percents = shown_results(page)
            assert labels == expected
            assert all(re.fullmatch(r"\d+(\.\d+)?%", p) for p in percents), percents
            widths = page.eval_on_selector_all(
                ".fill", "els => els.map(e => e.getBoundingClientRect().width)"
            )
            assert (
                len(widths) == 5
                and all(w > 0 for w in widths)
                and widths == sorted(widths, reverse=True)
            )
            assert page.locator("#preview").evaluate("img => img.naturalWidth") == 512
            page.screenshot(path=ARTIFACTS / "serve-page.png", full_page=True)

            # a broken file: the error is shown in the page, no bars
            page.set_input_files("#file", str(broken))
            page.wait_for_selector("#error:not(:empty)")
            assert "not an image" in page.inner_text("#error")
            assert not page.is_visible("#results")
            page.screenshot(path=ARTIFACTS / "serve-page-error.png", full_page=True)

            # paste and drop deliver the same file through the page's other two inputs
            data = base64.b64encode(photo.read_bytes()).decode()
            for event in ("paste", "drop"):
                page.evaluate("document.getElementById('results').replaceChildren()")
                page.evaluate(
                    """([data, event]) => {
                        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                        const transfer = new DataTransfer();
                        transfer.items.add(new File([bytes], "photo.jpg", {type: "image/jpeg"}));
                        const target = event === "paste" ? document : document.getElementById("drop");
                        target.dispatchEvent(event === "paste"
                            ? new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true})
                            : new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
                    }""",
                    [data, event],
                )
                assert shown_results(page)[0] == expected, event
                assert page.inner_text("#error") == ""

            # a phone-sized screen: everything fits its width
            phone = browser.new_page(viewport={"width": 375, "height": 740}, device_scale_factor=2)
            phone.goto(server + "/")
            phone.set_input_files("#file", str(photo))
            assert shown_results(phone)[0] == expected
            assert phone.evaluate("document.documentElement.scrollWidth") <= 375
            phone.screenshot(path=ARTIFACTS / "serve-page-phone.png", full_page=True)
            assert elsewhere == []  # self-contained: nothing loaded from another origin
        finally:
            browser.close()
    print(f"screenshots: {ARTIFACTS}/serve-page*.png")


def test_page_toggle_overlays_the_map_of_the_selected_class(server, files):
    from playwright.sync_api import sync_playwright

    photo = files / "astronaut.jpg"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(server + "/")
            page.set_input_files("#file", str(photo))
            assert len(shown_results(page)[0]) == 5
            with page.expect_response(lambda r: "/v1/explain" in r.url) as first:
                page.check("#cam")
            assert first.value.status == 200 and "target" not in first.value.url
            page.wait_for_function("document.getElementById('preview').src.startsWith('blob:')")
            page.wait_for_function("document.getElementById('preview').naturalWidth !== 512")
            with page.expect_response(lambda r: "/v1/explain" in r.url) as second:
                page.locator(".result").nth(1).click()
            assert second.value.status == 200 and "target=" in second.value.url
            current = page.eval_on_selector_all(
                ".result", "els => els.map(e => e.getAttribute('aria-current'))"
            )
            assert current == ["false", "true", "false", "false", "false"]
            assert page.inner_text("#error") == ""
            page.screenshot(path=ARTIFACTS / "serve-page-cam.png", full_page=True)
            page.uncheck("#cam")  # back to the photograph
            page.wait_for_function("document.getElementById('preview').naturalWidth === 512")
        finally:
            browser.close()
