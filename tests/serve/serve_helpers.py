"""Helpers of the server tests: a spy pipeline, images as base64, waiting for a condition."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image

from turbokit.pipeline import GenerationResult, TurboPipeline


class SpyPipeline:
    """The tiny pipeline, recording the prompts and keyword arguments of every call.

    Clear `gate` to hold calls (the worker thread waits in the call); `entered` is set when a call starts."""

    def __init__(self, pipe: TurboPipeline) -> None:
        self.pipe = pipe
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, prompt: list[str], **kwargs: Any) -> GenerationResult:
        self.calls.append((list(prompt), kwargs))
        self.entered.set()
        if not self.gate.wait(30):
            raise RuntimeError("the test never opened the gate")
        return self.pipe(prompt, **kwargs)

    @property
    def prompts(self) -> list[list[str]]:
        return [prompts for prompts, _ in self.calls]


def image_base64(image: Image.Image, fmt: str = "PNG", data_url: bool = True) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/{fmt.lower()};base64,{text}" if data_url else text


def decode_base64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1])))


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached in time")
