"""The HTTP API over the tiny model: auth, each endpoint's happy path, 4xx for bad input, 429, 504,
batching and cancellation as a client sees them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from PIL import Image
from serve_helpers import SpyPipeline, decode_base64_image, image_base64, wait_until

from turbokit.metadata import GenerationParameters
from turbokit.pipeline import TurboPipeline
from turbokit.serve import Settings
from turbokit.serve.app import create_app
from turbokit.serve.schemas import MAX_BODY_BYTES


def png(width: int, height: int, data: bytes = b"") -> bytes:
    """A PNG whose header claims `width`x`height`, with `data` as its only (compressed) pixel data:
    a decompression-bomb probe, or a corrupt image."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_health_is_open_and_everything_else_needs_the_key(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe, api_key="sesame") as client:
        assert client.get("/health").json() == {"status": "ok"}
        for public in ("/", "/openapi.json", "/docs"):  # the page and the API's description carry no data
            assert client.get(public).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"}):
            response = client.get("/api/model", headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer KEY" in response.json()["detail"]
        assert client.post("/api/txt2img", json={"prompt": "a"}).status_code == 401
        assert client.post("/v1/images/generations", json={"prompt": "a"}).status_code == 401
        assert client.get("/api/model", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_model_describes_the_loaded_model_and_the_limits(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe, max_side=1024) as client:
        info = client.get("/api/model").json()
    assert info["family"] == "sd2" and info["native_size"] == 64 and info["device"] == "cpu"
    assert info["default_sampler"] == "euler" and info["samplers"] == ["euler", "euler_a"]
    assert info["limits"]["max_side"] == 1024 and info["limits"]["max_images"] == 8
    assert info["dtype"] in ("fp32", "bf16")


def test_txt2img_returns_pngs_with_their_parameters(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    request = {"prompt": "a fox", "n": 2, "seed": 7, "steps": 2, "width": 64, "height": 48, "sampler": "euler_a"}
    with serving(tiny_pipe) as client:
        body = client.post("/api/txt2img", json=request).json()
        again = client.post("/api/txt2img", json=request).json()
    assert body["seeds"] == [7, 8]
    for png, infotext, seed in zip(body["images"], body["parameters"], body["seeds"], strict=True):
        image = decode_base64_image(png)
        assert image.format == "PNG" and image.size == (64, 48)
        assert image.info["parameters"] == infotext
        params = GenerationParameters.from_infotext(infotext)
        assert (params.prompt, params.seed, params.steps, params.sampler) == ("a fox", seed, 2, "Euler a")
    assert again["images"] == body["images"]  # the same seeds give the same images


def test_img2img_takes_a_data_url_or_raw_base64_in_any_common_format(
    tiny_pipe: TurboPipeline, serving: Callable
) -> None:
    source = Image.new("RGB", (128, 64), (200, 30, 30))
    with serving(tiny_pipe) as client:
        for image in (image_base64(source), image_base64(source, "JPEG", data_url=False), image_base64(source, "WEBP")):
            response = client.post("/api/img2img", json={"prompt": "a", "image": image, "steps": 2, "strength": 0.5})
            assert response.status_code == 200, response.text
            result = decode_base64_image(response.json()["images"][0])
            params = GenerationParameters.from_infotext(result.info["parameters"])
            assert params.strength == 0.5
            assert result.size == (88, 48)  # the source's 2:1 shape at the model's native area, multiples of 8


def test_openai_images_api(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe) as client:
        response = client.post(
            "/v1/images/generations",
            json={"prompt": "a", "n": 2, "size": "64x32", "model": "dall-e-3", "quality": "hd"},
        )
        refused = client.post("/v1/images/generations", json={"prompt": "a", "response_format": "url"})
    body = response.json()
    assert response.status_code == 200 and abs(body["created"] - time.time()) < 60
    assert [item["revised_prompt"] for item in body["data"]] == [None, None]
    assert decode_base64_image(body["data"][1]["b64_json"]).size == (64, 32)
    assert refused.status_code == 400 and "b64_json" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("path", "change", "status", "says"),
    [
        ("/api/txt2img", {"steps": 0}, 422, "steps"),
        ("/api/txt2img", {"steps": 51}, 422, "steps"),
        ("/api/txt2img", {"steps": True}, 422, "valid integer"),  # not read as 1
        ("/api/txt2img", {"seed": "7"}, 422, "valid integer"),
        ("/api/txt2img", {"guidance_scale": False}, 422, "valid number"),
        ("/v1/images/generations", {"n": True}, 422, "valid integer"),
        ("/api/txt2img", {"width": 100}, 422, "multiple of 8"),
        ("/api/txt2img", {"height": 4096}, 422, "height"),
        ("/api/txt2img", {"n": 9}, 422, "n"),
        ("/api/txt2img", {"prompt": "x" * 2001}, 422, "2000"),
        ("/api/txt2img", {"prompt": "\ud800"}, 422, "unicode"),
        ("/api/txt2img", {"guidance_scale": 31}, 422, "guidance_scale"),
        ("/api/txt2img", {"seed": -1}, 422, "seed"),
        ("/api/txt2img", {"seed": 2**63}, 422, "seed"),
        ("/api/txt2img", {"sampler": "dpm"}, 422, "sampler"),
        ("/api/txt2img", {"stpes": 2}, 422, "stpes"),
        ("/api/txt2img", {"seed": 2**63 - 1, "n": 2}, 400, "seed + n - 1"),
        ("/api/txt2img", {"width": 8}, 400, "width must be a multiple of 8 between 16"),
        ("/api/txt2img", {"width": 1024}, 400, "over this server's limit of 512"),
        ("/api/img2img", {"strength": 0}, 422, "strength"),
        ("/api/img2img", {"steps": 1, "strength": 0.5}, 400, "int(steps × strength)"),
        ("/api/img2img", {"image": "not base64!"}, 400, "not valid base64"),
        ("/api/img2img", {"image": b64(b"hello, not an image")}, 400, "not an image"),
        ("/api/img2img", {"image": b64(png(64, 64, b"garbage"))}, 400, "corrupt or truncated"),
        ("/api/img2img", {"image": b64(png(5000, 5000))}, 400, "megapixel limit"),
        ("/api/img2img", {"image": b64(png(100_000, 100_000))}, 400, "megapixel limit"),
        ("/api/img2img", {"image": ""}, 400, "empty"),
        ("/v1/images/generations", {"size": "100x100"}, 422, "multiple of 8"),
        ("/v1/images/generations", {"size": "big"}, 422, "size"),
        ("/v1/images/generations", {"response_format": "png"}, 422, "response_format"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(
    tiny_pipe: TurboPipeline, serving: Callable, path: str, change: dict[str, Any], status: int, says: str
) -> None:
    valid = {"prompt": "a", "width": 64, "height": 64}
    if path == "/api/img2img":
        valid.update(image=image_base64(Image.new("RGB", (64, 64))), steps=2)
    if path.startswith("/v1"):
        valid = {"prompt": "a", "size": "64x64"}
    with serving(tiny_pipe, max_side=512) as client:
        # json.dumps escapes the lone surrogate, which UTF-8 (and so httpx's json=) cannot carry.
        body = json.dumps({**valid, **change}).encode()
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert says in json.dumps(response.json(), ensure_ascii=False)


def test_bodies_over_the_limit_and_non_json_bodies_are_refused(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe) as client:
        big = client.post("/api/txt2img", content=b"x" * (MAX_BODY_BYTES + 1), headers={"content-type": "text/plain"})
        text = client.post("/api/txt2img", content=b'{"prompt": "a"}', headers={"content-type": "text/plain"})
    assert big.status_code == 413
    assert text.status_code == 422  # a cross-site form cannot post JSON as text/plain


def test_a_full_queue_answers_429_with_retry_after(spy: SpyPipeline, serving: Callable) -> None:
    spy.gate.clear()
    with serving(spy, max_queue=1) as client, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/api/txt2img", json={"prompt": "running"})
        wait_until(spy.entered.is_set)
        queued = pool.submit(client.post, "/api/txt2img", json={"prompt": "queued"})
        wait_until(lambda: client.app.state.worker.queued == 1)
        refused = client.post("/api/txt2img", json={"prompt": "refused"})
        spy.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "busy" in refused.json()["detail"]
    assert spy.prompts == [["running"], ["queued"]]


def test_requests_with_identical_settings_are_batched(spy: SpyPipeline, serving: Callable) -> None:
    spy.gate.clear()
    with serving(spy, max_batch=8) as client, ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/api/txt2img", json={"prompt": "first"})
        wait_until(spy.entered.is_set)
        same = [pool.submit(client.post, "/api/txt2img", json={"prompt": p, "seed": i}) for i, p in enumerate("ab")]
        openai = pool.submit(client.post, "/v1/images/generations", json={"prompt": "c", "size": "64x64"})
        wait_until(lambda: client.app.state.worker.queued == 3)
        spy.gate.set()
        responses = [future.result() for future in (first, *same, openai)]
    assert all(r.status_code == 200 for r in responses)
    assert spy.prompts[0] == ["first"] and sorted(spy.prompts[1]) == ["a", "b", "c"] and len(spy.calls) == 2
    assert [r.json()["seeds"] for r in responses[1:3]] == [[0], [1]]


def test_a_request_over_the_time_limit_answers_504(spy: SpyPipeline, serving: Callable) -> None:
    spy.gate.clear()
    with serving(spy, timeout=0.2) as client:
        response = client.post("/api/txt2img", json={"prompt": "slow"})
        spy.gate.set()
    assert response.status_code == 504 and "0.2 s" in response.json()["detail"]


def test_a_client_that_disconnects_while_queued_is_dropped(spy: SpyPipeline) -> None:
    """Raw ASGI, so that the client can hang up mid-request."""
    app = create_app(spy, Settings())

    async def call(prompt: str, hang_up: asyncio.Event) -> int:
        body = json.dumps({"prompt": prompt}).encode()
        sent = False
        status = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        scope = {
            "type": "http",
            "http_version": "1.1",
            "scheme": "http",
            "server": ("testserver", 80),
            "client": ("testclient", 5000),
            "root_path": "",
            "method": "POST",
            "path": "/api/txt2img",
            "raw_path": b"/api/txt2img",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "query_string": b"",
        }
        await app(scope, receive, send)
        return status[0]

    async def scenario() -> list[int]:
        async with app.router.lifespan_context(app):
            spy.gate.clear()
            stays, leaves = asyncio.Event(), asyncio.Event()
            first = asyncio.create_task(call("first", stays))
            while not spy.entered.is_set():
                await asyncio.sleep(0.005)
            gone = asyncio.create_task(call("gone", leaves))
            while app.state.worker.queued < 1:
                await asyncio.sleep(0.005)
            leaves.set()
            gone_status = await gone
            assert app.state.worker.queued == 0
            spy.gate.set()
            return [await first, gone_status]

    assert asyncio.run(scenario()) == [200, 499]
    assert spy.prompts == [["first"]]


def test_root_serves_a_page_and_hosts_can_be_restricted(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe, allowed_hosts=("testserver",)) as client:
        assert "text/html" in client.get("/").headers["content-type"]
        assert client.get("/health", headers={"host": "evil.example"}).status_code == 400
    spec = create_app(tiny_pipe).openapi()
    assert {"/v1/images/generations", "/api/txt2img", "/api/img2img", "/api/model", "/health"} <= set(spec["paths"])


def test_an_upload_image_is_decoded_upright(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    """A JPEG whose EXIF says 'rotate 90°' is used as it would be displayed (tall, not wide)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (128, 64)).save(buffer, format="JPEG", exif=exif)
    with serving(tiny_pipe) as client:
        response = client.post("/api/img2img", json={"prompt": "a", "image": b64(buffer.getvalue()), "steps": 2})
    assert decode_base64_image(response.json()["images"][0]).size == (48, 88)


def test_turbokit_serve_listens_on_loopback_with_a_key(tiny_models: dict[str, Path]) -> None:
    """The command line end to end: a real socket, the key, a WebSocket frame over 1 MB, Ctrl-C."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "turbokit", "serve", "-m", str(tiny_models["sd2"]), "--port", str(port)]
    server = subprocess.Popen([*command, "--api-key", "sesame", "-q"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.1)
        assert httpx.get(url + "/api/model").status_code == 401
        assert httpx.get(url + "/api/model", headers={"Authorization": "Bearer sesame"}).json()["family"] == "sd2"

        async def live() -> dict[str, Any]:
            noise = Image.frombytes("RGB", (800, 800), os.urandom(800 * 800 * 3))  # ~2 MB as a PNG
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws?api_key=sesame", max_size=None) as ws:
                await ws.send(json.dumps({"type": "params", "mode": "img2img", "steps": 2, "seed": 1}))
                await ws.send(json.dumps({"type": "frame", "image": image_base64(noise)}))
                return json.loads(await ws.recv())

        reply = asyncio.run(live())
        assert reply["type"] == "image" and reply["id"] == 2, reply
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0
