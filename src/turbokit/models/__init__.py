"""The models that ship inside turbokit: `shapes-turbo`, the Turbo student of `turbokit recipe shapes`.

It is the default model of every command, so turbokit runs on a fresh machine with no network. It knows
only the `shapes` world (coloured shapes on plain backgrounds, 64×64); point `-m` (or $TURBOKIT_MODEL) at
any SD 1.x/2.x/SDXL Turbo model for real images.
"""

from __future__ import annotations

import os
from pathlib import Path

SHAPES_TURBO = Path(__file__).parent / "shapes-turbo"
SHAPES_EVALUATOR = Path(__file__).parent / "shapes-evaluator"  # the study's judge, for `turbokit eval`


def default_model() -> str:
    """$TURBOKIT_MODEL if set, else the shipped shapes-turbo folder (else, in a build without it,
    SD-Turbo from the hub)."""
    if os.environ.get("TURBOKIT_MODEL"):
        return os.environ["TURBOKIT_MODEL"]
    return str(SHAPES_TURBO) if (SHAPES_TURBO / "model_index.json").is_file() else "stabilityai/sd-turbo"
