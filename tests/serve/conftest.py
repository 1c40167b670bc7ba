"""The server over the tiny SD 2.x model, loaded once; a spy around it that records and can hold calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serve_helpers import SpyPipeline

from turbokit.pipeline import TurboPipeline
from turbokit.serve import Settings
from turbokit.serve.app import create_app


@pytest.fixture(scope="session")
def tiny_pipe(tiny_models: dict[str, Path]) -> TurboPipeline:
    return TurboPipeline.from_pretrained(tiny_models["sd2"], device="cpu")


@pytest.fixture
def spy(tiny_pipe: TurboPipeline) -> Iterator[SpyPipeline]:
    spy = SpyPipeline(tiny_pipe)
    yield spy
    spy.gate.set()  # never leave a worker thread waiting


@pytest.fixture
def serving() -> Callable[..., Any]:
    """`with serving(pipe, max_queue=1) as client:` — a TestClient over create_app(pipe, Settings(...))."""

    @contextmanager
    def serve(pipe: Any, **settings: Any) -> Iterator[TestClient]:
        with TestClient(create_app(pipe, Settings(**settings))) as client:
            yield client

    return serve
