"""The diffusers configs of the released Turbo models, shipped so single files load with no hub access."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent
_DIRS = {"sd1": "sd-turbo", "sd2": "sd-turbo", "sdxl": "sdxl-turbo"}


def turbo_config_dir(family: str) -> Path:
    """Folder with model_index.json and per-component configs for the family's Turbo model."""
    return _HERE / _DIRS[family]
