"""Tiny random-weight models, built once per test session (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbokit.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_model(root / family, family) for family in ("sd1", "sd2", "sdxl")}
