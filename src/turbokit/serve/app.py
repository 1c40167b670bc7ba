"""The FastAPI app: OpenAI-style `/v1/images/generations`, `/api/txt2img` and `/api/img2img`,
`/api/model`, `/health`, the live WebSocket `/ws` and the web page at `/`.

    app = create_app(TurboPipeline.from_pretrained("path/to/sd-turbo"), Settings(api_key="secret"))

Errors a user can cause answer 4xx with `{"detail": "what to do"}`; the protocol is in docs/serve.md.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from turbokit import __version__
from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.info import DTYPE_NAMES
from turbokit.metadata import PNG_TEXT_KEY, GenerationParameters
from turbokit.serve import Settings
from turbokit.serve.live import LiveSession
from turbokit.serve.schemas import (
    MAX_BODY_BYTES,
    ErrorResponse,
    GenerationFields,
    GenerationResponse,
    Health,
    Img2ImgRequest,
    Limits,
    ModelInfo,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    Txt2ImgRequest,
    decode_image,
)
from turbokit.serve.worker import (
    ClientGoneError,
    GenerationTimeoutError,
    Job,
    JobResult,
    ModelWorker,
    QueueFullError,
    new_job,
)

STATIC_DIR = Path(__file__).parent / "static"
WS_POLICY_VIOLATION = 1008  # WebSocket close code for a refused connection

_NO_PAGE = """<!doctype html><title>turbokit serve</title>
<p>turbokit is running. The web page is not installed; the API is described at <a href="/docs">/docs</a>.</p>"""


def create_app(pipe_or_factory: Any, settings: Settings | None = None) -> FastAPI:
    """The server app over a loaded pipeline, or over a zero-argument factory that loads one at startup."""
    settings = settings or Settings()
    is_factory = callable(pipe_or_factory) and not hasattr(pipe_or_factory, "native_size")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipe = await asyncio.to_thread(pipe_or_factory) if is_factory else pipe_or_factory
        worker = ModelWorker(pipe, max_queue=settings.max_queue, max_batch=settings.max_batch)
        worker.start()
        app.state.worker = worker
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="turbokit",
        version=__version__,
        summary="Turbo diffusion models over HTTP and WebSocket",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    if settings.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    _add_error_handlers(app)

    authorized = [Depends(_bearer_check(settings.api_key))] if settings.api_key else []
    auth_errors: dict[int | str, dict[str, Any]] = {}
    if settings.api_key:
        auth_errors[401] = {"model": ErrorResponse, "description": "missing or wrong API key"}
    generation_errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "settings that cannot work, or a bad image"},
        413: {"model": ErrorResponse, "description": f"a request body over {MAX_BODY_BYTES} bytes"},
        429: {"model": ErrorResponse, "description": "the queue is full: retry after `Retry-After` seconds"},
        504: {"model": ErrorResponse, "description": "not ready within the server's time limit"},
    }
    api = APIRouter(dependencies=authorized, responses=auth_errors)

    @app.get("/health", tags=["server"])
    async def health() -> Health:
        return Health()

    @api.get("/api/model", tags=["server"])
    async def model(request: Request) -> ModelInfo:
        pipe = _worker(request).pipe
        return ModelInfo(
            name=pipe.model_name,
            family=pipe.family_name,
            native_size=pipe.native_size,
            default_sampler=pipe.default_sampler,
            dtype=DTYPE_NAMES[pipe.precision.compute],
            vae_dtype=DTYPE_NAMES[pipe.precision.vae],
            device=str(pipe.device),
            limits=Limits(max_side=settings.max_side, max_steps=settings.max_steps),
        )

    @api.post("/api/txt2img", responses=generation_errors, tags=["generation"])
    async def txt2img(body: Txt2ImgRequest, request: Request) -> GenerationResponse:
        """Text to image: `n` images, image i with seed + i, as PNGs carrying their parameters."""
        key = body.batch_key(settings, _worker(request).pipe.native_size)
        job = new_job(key, body.prompt, body.n, body.seed)
        return await _png_response(await _generate(request, job, settings))

    @api.post("/api/img2img", responses=generation_errors, tags=["generation"])
    async def img2img(body: Img2ImgRequest, request: Request) -> GenerationResponse:
        """Image to image: runs int(steps × strength) steps from the uploaded image."""
        image, digest = await asyncio.to_thread(decode_image, body.image)
        key = body.batch_key(
            settings,
            _worker(request).pipe.native_size,
            strength=body.strength,
            image=image,
            image_digest=digest,
        )
        job = new_job(key, body.prompt, body.n, body.seed, image)
        return await _png_response(await _generate(request, job, settings))

    @api.post("/v1/images/generations", responses=generation_errors, tags=["openai"])
    async def openai_generations(body: OpenAIImageRequest, request: Request) -> OpenAIImagesResponse:
        """OpenAI's images API: `size` is any WIDTHxHEIGHT in multiples of 8; only `b64_json` is returned."""
        if body.response_format == "url":
            raise InvalidRequestError(
                'response_format "url" is not supported: this server keeps no files; use "b64_json" (the default)'
            )
        width, height = map(int, body.size.split("x"))
        fields = GenerationFields(prompt=body.prompt, width=width, height=height)
        job = new_job(fields.batch_key(settings, _worker(request).pipe.native_size), body.prompt, body.n, None)
        result = await _generate(request, job, settings)
        pngs = await asyncio.to_thread(_pngs, result)
        return OpenAIImagesResponse(created=int(time.time()), data=[OpenAIImage(b64_json=png) for png in pngs])

    app.include_router(api)

    @app.websocket("/ws")
    async def live(websocket: WebSocket) -> None:
        refusal = _websocket_refusal(websocket, settings.api_key)
        if refusal is not None:
            await websocket.close(code=WS_POLICY_VIOLATION, reason=refusal)
            return
        await websocket.accept()
        await LiveSession(websocket, websocket.app.state.worker, settings).run()

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(_NO_PAGE)

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---------------------------------------------------------------------- requests and responses


def _worker(request: Request) -> ModelWorker:
    return request.app.state.worker


async def _generate(request: Request, job: Job, settings: Settings) -> JobResult:
    """The job's images; its queued work is dropped if the client disconnects or the time runs out."""

    async def until_disconnected() -> None:
        # The body has been read, so the next message is the disconnect, whenever it comes.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return await _worker(request).generate(job, timeout=settings.timeout, until_disconnected=until_disconnected)


def _png_base64(image: Image.Image, params: GenerationParameters) -> str:
    """A PNG with the A1111 `parameters` text chunk, in base64."""
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, params.to_infotext())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pngs(result: JobResult) -> list[str]:
    return [_png_base64(image, params) for image, params in zip(result.images, result.parameters, strict=True)]


async def _png_response(result: JobResult) -> GenerationResponse:
    return GenerationResponse(
        images=await asyncio.to_thread(_pngs, result),
        seeds=[p.seed for p in result.parameters],
        parameters=[p.to_infotext() for p in result.parameters],
    )


# ---------------------------------------------------------------------- authentication


def _key_matches(given: str | None, key: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), key.encode())


def _bearer_check(key: str) -> Callable[..., None]:
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if not _key_matches(credentials.credentials if credentials else None, key):
            raise HTTPException(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                {"WWW-Authenticate": "Bearer"},
            )

    return check


def _websocket_refusal(websocket: WebSocket, key: str | None) -> str | None:
    """Why a WebSocket connection is refused, or None to accept it.

    With a key: `?api_key=KEY` (browsers cannot set headers on WebSockets) or a Bearer header.
    Without one, a browser page from another origin is refused: WebSockets are not covered by the
    same-origin policy, so any site the user visits could otherwise drive a loopback server."""
    if key is not None:
        header = websocket.headers.get("authorization", "")
        bearer = header[7:] if header.lower().startswith("bearer ") else None
        if _key_matches(websocket.query_params.get("api_key"), key) or _key_matches(bearer, key):
            return None
        return "missing or wrong API key: connect to /ws?api_key=KEY"
    origin = websocket.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != websocket.headers.get("host"):
        return "cross-origin WebSocket refused: serve the page from this server, or start it with --api-key"
    return None


# ---------------------------------------------------------------------- errors and limits


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> Response:
        # Without the inputs (an image can be megabytes), and with ASCII escapes: a lone surrogate
        # in a field name would make UTF-8 encoding fail.
        detail = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in err.errors()]
        return Response(json.dumps({"detail": detail}), 422, media_type="application/json")

    @app.exception_handler(TurbokitError)
    async def bad_request(_: Request, err: TurbokitError) -> Response:
        return error(400, str(err))

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, err: QueueFullError) -> Response:
        return error(429, str(err), {"Retry-After": str(err.retry_after)})

    @app.exception_handler(GenerationTimeoutError)
    async def timed_out(_: Request, err: GenerationTimeoutError) -> Response:
        return error(504, str(err))

    @app.exception_handler(ClientGoneError)
    async def client_gone(_: Request, err: ClientGoneError) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


class BodyLimitMiddleware:
    """Answers 413 to a request body over `max_bytes` (uvicorn itself has no limit) before the app sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse({"detail": f"the request body is over {self.max_bytes} bytes"}, status_code=413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            await JSONResponse({"detail": "bad Content-Length header"}, status_code=400)(scope, receive, send)
            return
        if int(length) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
