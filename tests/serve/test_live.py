"""Live WebSocket sessions: images for params and frames, the latest request wins, errors keep the session."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image
from serve_helpers import SpyPipeline, decode_base64_image, image_base64, wait_until
from starlette.websockets import WebSocketDisconnect

from turbokit.pipeline import TurboPipeline

PARAMS = {"type": "params", "prompt": "a fox", "steps": 1, "seed": 3, "width": 64, "height": 64}


def receive(ws: Any, kind: str) -> dict[str, Any]:
    message = ws.receive_json()
    assert message["type"] == kind, message
    return message


def test_params_give_a_jpeg_with_what_made_it(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe) as client, client.websocket_connect("/ws") as ws:
        ws.send_json(PARAMS)
        reply = receive(ws, "image")
    assert reply["id"] == 1 and reply["seed"] == 3 and reply["elapsed_ms"] >= 0
    assert reply["params"]["prompt"] == "a fox" and reply["params"]["mode"] == "txt2img"
    assert reply["image"].startswith("data:image/jpeg;base64,")
    assert decode_base64_image(reply["image"]).size == (64, 64)


def test_the_latest_request_wins(spy: SpyPipeline, serving: Callable) -> None:
    spy.gate.clear()
    with serving(spy) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({**PARAMS, "prompt": "p0"})
        wait_until(spy.entered.is_set)
        for i in range(1, 6):  # typed while p0 is being made
            ws.send_json({**PARAMS, "prompt": f"p{i}"})
        time.sleep(0.3)
        spy.gate.set()
        replies = [receive(ws, "image")]
        while replies[-1]["params"]["prompt"] != "p5":
            replies.append(receive(ws, "image"))
    assert [r["params"]["prompt"] for r in replies] == ["p0", "p5"]
    assert [r["id"] for r in replies] == [1, 6]
    assert spy.prompts == [["p0"], ["p5"]]


def test_img2img_waits_for_a_frame_and_uses_the_latest(spy: SpyPipeline, serving: Callable) -> None:
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 64), "blue")
    with serving(spy) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({**PARAMS, "mode": "img2img", "steps": 2, "strength": 0.5, "width": None, "height": None})
        ws.send_json({"type": "frame", "image": image_base64(red, "JPEG")})
        first = receive(ws, "image")
        ws.send_json({"type": "frame", "image": image_base64(blue, "PNG", data_url=False)})
        second = receive(ws, "image")
    assert (first["id"], second["id"]) == (2, 3)
    assert len(spy.calls) == 2  # the params alone generated nothing
    sources = [kwargs["image"] for _, kwargs in spy.calls]
    assert sources[0].getpixel((0, 0))[0] > 200 and sources[1].size == (96, 64)
    assert decode_base64_image(second["image"]).size == (80, 56)  # the frame's shape at the native area
    assert second["params"]["mode"] == "img2img" and second["params"]["strength"] == 0.5


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("not json", "not a JSON object"),
        ("[1, 2]", "not a JSON object"),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ('{"type": "params", "steps": 0}', "steps"),
        ('{"type": "params", "prompt": "a", "colour": "red"}', "colour"),
        ('{"type": "params", "mode": "img2img", "steps": 1, "strength": 0.5}', "int(steps × strength)"),
        ('{"type": "frame"}', "needs"),
        (b"\x00binary", "not binary"),
    ],
)
def test_bad_messages_get_an_error_and_the_session_goes_on(
    tiny_pipe: TurboPipeline, serving: Callable, message: str | bytes, says: str
) -> None:
    with serving(tiny_pipe) as client, client.websocket_connect("/ws") as ws:
        if isinstance(message, bytes):
            ws.send_bytes(message)
        else:
            ws.send_text(message)
        assert says in receive(ws, "error")["message"]
        ws.send_json(PARAMS)
        assert receive(ws, "image")["id"] == 1


def test_a_bad_frame_is_reported_and_the_next_good_one_is_used(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({**PARAMS, "mode": "img2img", "steps": 2})
        ws.send_json({"type": "frame", "image": "data:image/jpeg;base64,////"})
        assert "not an image" in receive(ws, "error")["message"]
        ws.send_json({"type": "frame", "image": image_base64(Image.new("RGB", (64, 64)))})
        assert receive(ws, "image")["id"] == 3


def test_the_key_is_passed_as_a_query_parameter(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe, api_key="sesame") as client:
        for url in ("/ws", "/ws?api_key=wrong"):
            with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect(url):
                pass
            assert refused.value.code == 1008
        with client.websocket_connect("/ws?api_key=sesame") as ws:
            ws.send_json(PARAMS)
            assert receive(ws, "image")["id"] == 1


def test_other_sites_cannot_open_a_session_on_a_keyless_server(tiny_pipe: TurboPipeline, serving: Callable) -> None:
    with serving(tiny_pipe) as client:
        with (
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect("/ws", headers={"origin": "https://evil.example"}),
        ):
            pass
        with client.websocket_connect("/ws", headers={"origin": "http://testserver"}) as ws:
            ws.send_json(PARAMS)
            assert receive(ws, "image")["id"] == 1
