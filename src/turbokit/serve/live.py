"""Live sessions over a WebSocket: the client streams settings and frames, the server answers with
images, always for the LATEST request — what arrives while an image is being made replaces what
is waiting, so a fast typist or a 30 fps camera never builds a backlog.

Messages (JSON text; docs/serve.md has the full protocol):
    client → {"type": "params", "prompt": ..., "mode": "txt2img" | "img2img", ...}  every setting, replacing the last
    client → {"type": "frame", "image": "data:image/jpeg;base64,..."}  the img2img source
    server → {"type": "image", "id": N, "image": "data:image/jpeg;base64,...", "params": {...}, "seed": S,
              "elapsed_ms": T}
    server → {"type": "error", "message": "..."}  the session stays open
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import time
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from PIL import Image
from pydantic import ValidationError

from turbokit.errors import TurbokitError
from turbokit.serve import Settings
from turbokit.serve.schemas import MAX_IMAGE_CHARS, LiveParams, decode_image
from turbokit.serve.worker import Job, ModelWorker, QueueFullError, new_job

log = logging.getLogger("turbokit")

JPEG_QUALITY = 90


def validation_message(err: ValidationError) -> str:
    """A pydantic error as one line: `field: problem; field: problem`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in err.errors())


def jpeg_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class LiveSession:
    """One client's session: the latest `params` and `frame`, and one generation at a time."""

    def __init__(self, websocket: WebSocket, worker: ModelWorker, settings: Settings) -> None:
        self.websocket, self.worker, self.settings = websocket, worker, settings
        self.params: LiveParams | None = None
        self.frame: str | None = None
        self.request_id = 0  # numbers the accepted params and frame messages: 1, 2, ...
        self.received_at = 0.0
        self.changed = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.closed = False
        self._decoded: tuple[str, Image.Image, str] | None = None  # (frame text, image, digest) of the last frame

    async def run(self) -> None:
        generating = asyncio.create_task(self._generate_latest())
        try:
            while not self.closed:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    await self.send_error("send JSON text messages, not binary ones")
                else:
                    await self._handle(message["text"])
        finally:
            self.closed = True
            generating.cancel()  # a queued job of this session leaves the queue
            with contextlib.suppress(asyncio.CancelledError):
                await generating

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            if self.closed:
                return
            try:
                # ASCII escapes: a lone surrogate echoed from a bad message cannot be sent as UTF-8.
                await self.websocket.send_text(json.dumps(message))
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.closed = True

    async def send_error(self, message: str) -> None:
        await self.send({"type": "error", "message": message})

    async def _handle(self, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            await self.send_error('not a JSON object: each message is {"type": "params" or "frame", ...}')
            return
        kind = data.get("type")
        if kind == "params":
            try:
                params = LiveParams.model_validate(data)
                # Settings that can never work are refused now, not after the next frame.
                strength = params.strength if params.mode == "img2img" else None
                params.batch_key(self.settings, self.worker.pipe.native_size, strength=strength)
            except ValidationError as err:
                await self.send_error(f"bad params: {validation_message(err)}")
                return
            except TurbokitError as err:
                await self.send_error(f"bad params: {err}")
                return
            self.params = params
        elif kind == "frame":
            image = data.get("image")
            if not isinstance(image, str) or not image:
                await self.send_error('a frame message needs "image": a base64 image or data: URL')
                return
            if len(image) > MAX_IMAGE_CHARS:
                await self.send_error(f"the frame is over the {MAX_IMAGE_CHARS} character limit")
                return
            self.frame = image
        else:
            await self.send_error(f'unknown message type {kind!r}: send "params" or "frame"')
            return
        self.request_id += 1
        self.received_at = time.perf_counter()
        if self.params is not None and (kind == "params" or self.params.mode == "img2img"):
            self.changed.set()

    async def _generate_latest(self) -> None:
        """Generate for the latest request whenever there is a new one; what arrives meanwhile replaces it."""
        while not self.closed:
            await self.changed.wait()
            self.changed.clear()
            params, frame, request_id, received_at = self.params, self.frame, self.request_id, self.received_at
            if params is None or (params.mode == "img2img" and frame is None):
                continue  # img2img waits for its first frame
            try:
                job = await self._job(params, frame)
                result = await self.worker.generate(job, timeout=self.settings.timeout)
            except QueueFullError as err:
                await self.send_error(str(err))
                await asyncio.sleep(min(err.retry_after, 1.0))
                self.changed.set()  # retry with whatever is latest by then
                continue
            except TurbokitError as err:
                if params.mode == "img2img" and self.frame is frame:
                    self.frame = None  # a bad frame is not retried with the next params
                await self.send_error(str(err))
                continue
            except Exception:
                log.exception("live generation failed")
                await self.send_error("internal error: see the server log")
                continue
            image = await asyncio.to_thread(jpeg_data_url, result.images[0])
            await self.send(
                {
                    "type": "image",
                    "id": request_id,
                    "image": image,
                    "params": params.model_dump(exclude={"type"}),
                    "seed": result.parameters[0].seed,
                    "elapsed_ms": round((time.perf_counter() - received_at) * 1000),
                }
            )

    async def _job(self, params: LiveParams, frame: str | None) -> Job:
        if params.mode == "txt2img" or frame is None:
            return new_job(params.batch_key(self.settings, self.worker.pipe.native_size), params.prompt, 1, params.seed)
        if self._decoded is None or self._decoded[0] is not frame:
            image, digest = await asyncio.to_thread(decode_image, frame)
            self._decoded = (frame, image, digest)
        _, image, digest = self._decoded
        key = params.batch_key(
            self.settings, self.worker.pipe.native_size, strength=params.strength, image=image, image_digest=digest
        )
        return new_job(key, params.prompt, 1, params.seed, image)
