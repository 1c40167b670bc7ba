"""`turbokit serve`: an HTTP and WebSocket server over one TurboPipeline (issue #5).

    app.py      the FastAPI app: routes, authentication, error responses
    schemas.py  request and response models with their limits; safe decoding of uploaded images
    worker.py   the single model worker: bounded queue, batching of identical settings, timeouts
    live.py     WebSocket live sessions, where the latest request wins

The protocol is documented in docs/serve.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("turbokit")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_HOST_HEADERS = ("127.0.0.1", "localhost", "[::1]")  # as Host headers write them


@dataclass(frozen=True)
class Settings:
    """How the server schedules and what it allows; the request limits themselves are in `schemas`."""

    api_key: str | None = None
    """When set, every endpoint but /health (and the static page) needs `Authorization: Bearer KEY`."""
    max_queue: int = 16
    """Requests waiting for the model at most; more are refused with 429."""
    max_batch: int = 4
    """Images at most in one pipeline call made of several requests with identical settings."""
    timeout: float = 60.0
    """Seconds a request may wait and run before it is answered 504."""
    max_side: int = 2048
    """Largest width or height this server generates (the schema allows 2048; more is refused there)."""
    max_steps: int = 50
    """Most denoising steps this server runs (the schema allows 50)."""
    allowed_hosts: tuple[str, ...] | None = None
    """`Host` header names accepted (None: any); a loopback server accepts only loopback names,
    which stops DNS-rebinding pages from reaching it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `turbokit serve` options beyond the model options every sampling command shares."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TURBOKIT_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $TURBOKIT_API_KEY; none if unset)",
    )
    parser.add_argument("--max-queue", type=int, default=16, help="waiting requests before 429 (default: %(default)s)")
    parser.add_argument(
        "--max-batch", type=int, default=4, help="images per batched pipeline call (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=2048, help="largest width or height (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=50, help="most denoising steps (default: %(default)s)")


def serve(args: argparse.Namespace) -> None:
    """Load the model (errors are one line, before anything listens), then serve until interrupted."""
    import uvicorn

    from turbokit.errors import InvalidRequestError
    from turbokit.serve.app import create_app
    from turbokit.serve.schemas import MAX_BODY_BYTES

    for name in ("max_queue", "max_batch", "timeout", "max_side", "max_steps"):
        if getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    loopback = args.host in LOOPBACK_HOSTS
    if not loopback and not args.api_key:
        log.warning(f"listening on {args.host} without --api-key: anyone who can reach this port can use the model")
    from turbokit.cli import load_pipeline

    pipe = load_pipeline(args)
    settings = Settings(
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        timeout=args.timeout,
        max_side=args.max_side,
        max_steps=args.max_steps,
        allowed_hosts=LOOPBACK_HOST_HEADERS if loopback else None,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info(f"serving {pipe.model_name} on http://{host}:{args.port} (API docs at /docs)")
    uvicorn.run(
        create_app(pipe, settings),
        host=args.host,
        port=args.port,
        ws_max_size=MAX_BODY_BYTES,
        log_level="warning" if args.quiet else "info",
        access_log=not args.quiet,
        timeout_graceful_shutdown=10,
    )
