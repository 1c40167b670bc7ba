"""The web page, end to end: the real server (uvicorn, tiny SD 2.x model) driven by headless Chromium.

Needs Debian's `chromium` at /usr/bin/chromium (`.ci/run` and `make test` install it as root);
Playwright drives it, and never downloads a browser of its own. Without it these tests skip.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image

from turbokit.pipeline import TurboPipeline
from turbokit.serve import Settings
from turbokit.serve.app import create_app
from turbokit.serve.schemas import MAX_BODY_BYTES

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(
        f"{CHROMIUM} is missing: the web page's tests need Debian's chromium (apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the web page's tests need playwright (the dev extra)")

KEY = "sesame"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these, Chromium's own background connections are refused on a closed network
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # a webcam that grants itself and plays a test pattern
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def server(tiny_pipe: TurboPipeline) -> Iterator[str]:
    """The app with an API key, served by uvicorn on a free loopback port in a thread; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_app(tiny_pipe, Settings(api_key=KEY)), ws_max_size=MAX_BODY_BYTES, log_level="warning"
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if uvicorn_server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert uvicorn_server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    """The page, opened with the key in its URL, once its first image (empty prompt) is shown."""
    context = browser.new_context(accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{server}/?api_key={KEY}")
    page.wait_for_selector("#output[data-params]", state="attached")
    yield page
    context.close()


def shown(page: Any) -> dict[str, Any]:
    """The shown image's params (with its seed), its id and data URL."""
    output = page.locator("#output")
    params = json.loads(output.get_attribute("data-params"))
    return {**params, "id": int(output.get_attribute("data-id") or 0), "src": output.get_attribute("src")}


def wait_for_image(page: Any, **params: Any) -> dict[str, Any]:
    """Waits until the shown image was made with these params."""
    page.wait_for_function(
        """(want) => {
            const params = JSON.parse(document.querySelector("#output").dataset.params || "{}");
            return Object.entries(want).every(([name, value]) => params[name] === value);
        }""",
        arg=params,
    )
    return shown(page)


def test_typing_regenerates_with_the_same_seed_and_a_dropped_socket_reconnects(page: Any) -> None:
    first = shown(page)
    assert first["prompt"] == "" and first["mode"] == "txt2img"
    assert first["seed"] == int(page.input_value("#seed"))  # a fixed seed, chosen when the page opened
    history = page.locator("#history li")
    history.first.wait_for()  # an image shown for a second joins the history
    page.locator("#prompt").press_sequentially("a red fox", delay=20)
    typed = wait_for_image(page, prompt="a red fox")
    assert typed["src"].startswith("data:image/jpeg;base64,") and typed["src"] != first["src"]
    assert typed["seed"] == first["seed"] and typed["steps"] == 1
    history.nth(1).wait_for()
    assert history.count() == 2  # not one per keystroke
    assert page.locator("#error").is_hidden()

    page.evaluate("state.ws.close()")  # the connection drops: the page reconnects and goes on
    page.wait_for_function("state.ws && state.ws.readyState === WebSocket.OPEN")
    page.fill("#prompt", "a blue fox")
    wait_for_image(page, prompt="a blue fox")

    page.click("#history li:last-child button")  # the oldest entry: the empty prompt
    assert page.input_value("#prompt") == ""
    assert wait_for_image(page, prompt="")["src"] == first["src"]


def test_img2img_from_an_uploaded_picture(page: Any, tmp_path: Path) -> None:
    picture = tmp_path / "stripes.png"
    image = Image.new("RGB", (160, 96), "orange")
    image.paste((20, 40, 200), (0, 0, 80, 96))
    image.save(picture)
    page.fill("#prompt", "a watercolour")
    page.set_input_files("#upload", str(picture))
    result = wait_for_image(page, mode="img2img", prompt="a watercolour")
    assert result["strength"] == 0.5 and result["steps"] == 2  # steps raised so that one step runs
    assert page.is_checked("input[name=mode][value=img2img]")
    assert page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", page.query_selector("#output")) == [64, 64]
    assert page.locator("#source-image").is_visible()


def test_webcam_frames_become_images(page: Any) -> None:
    page.click("#webcam")
    first = wait_for_image(page, mode="img2img")
    assert page.get_attribute("#webcam", "aria-pressed") == "true"
    assert page.locator("#camera").is_visible()
    # frames keep coming: newer images follow without any input
    page.wait_for_function(f"Number(document.querySelector('#output').dataset.id) > {first['id'] + 2}")
    page.click("#webcam")
    assert page.get_attribute("#webcam", "aria-pressed") == "false"
    assert page.locator("#camera").is_hidden()


def test_server_errors_are_shown_in_the_page(page: Any) -> None:
    page.check("input[name=mode][value=img2img]")
    assert page.input_value("#steps") == "2"
    page.fill("#steps", "1")  # with strength 0.5, image-to-image would run int(1 × 0.5) = 0 steps
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "int(steps × strength)" in error.inner_text()
    page.fill("#steps", "2")  # a change hides it
    error.wait_for(state="hidden")

    page.check("input[name=mode][value=txt2img]")
    page.evaluate("state.key = 'wrong'")  # an HTTP error: the download is refused with 401
    page.click("#download")
    error.wait_for(state="visible")
    assert error.inner_text().startswith("download failed: missing or wrong API key")


def test_download_is_a_png_carrying_its_parameters(page: Any) -> None:
    page.fill("#prompt", "a lighthouse at dusk")
    result = wait_for_image(page, prompt="a lighthouse at dusk")
    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename == f"turbokit-{result['seed']}-a-lighthouse-at-dusk.png"
    png = Image.open(io.BytesIO(Path(download.path()).read_bytes()))
    assert png.format == "PNG" and png.size == (64, 64)
    infotext = png.info["parameters"]
    assert infotext.startswith("a lighthouse at dusk\n") and f"Seed: {result['seed']}" in infotext
    assert page.locator("#error").is_hidden()


def test_the_page_asks_for_the_key(browser: Any, server: str) -> None:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(server)
        page.locator("#auth").wait_for(state="visible")
        assert "needs its API key" in page.inner_text("#auth-reason")
        page.fill("#api-key", "wrong")
        page.click("#auth button")
        page.locator("#auth").wait_for(state="visible")  # asked again
        assert "refused" in page.inner_text("#auth-reason")
        page.fill("#api-key", KEY)
        page.click("#auth button")
        page.wait_for_selector("#output[data-params]", state="attached")
        assert page.locator("#auth").is_hidden()
    finally:
        context.close()
