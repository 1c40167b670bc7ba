"""Writing models that every reader loads, whatever its library versions.

transformers 5 saves a `CLIPTextModel` with its keys relative to the text model (`embeddings.…`),
where every released SD checkpoint and every transformers 4.x reader expects `text_model.embeddings.…`.
A 4.x reader given the new names does not fail: it warns and runs a randomly initialised text encoder.
transformers 5 reads both names, so turbokit writes the old ones. (`CLIPTextModelWithProjection`
already keeps its prefix.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

_PREFIX = "text_model."


def save_pretrained(model: Any, path: str | Path, **kwargs: Any) -> Path:
    """`model.save_pretrained(path)` — a diffusers pipeline or a transformers model — with the text
    encoders' weights under the names every reader loads. Every turbokit writer saves through this."""
    model.save_pretrained(path, **kwargs)
    legacy_text_encoder_keys(path)
    return Path(path)


def legacy_text_encoder_keys(folder: str | Path) -> list[Path]:
    """Rename the unprefixed weights of every `CLIPTextModel` in a pipeline folder (or a text encoder
    folder) to `text_model.…`, in place; returns the files rewritten."""
    root = Path(folder)
    rewritten = []
    for config in [root / "config.json", *root.glob("*/config.json")]:
        if not config.is_file():
            continue
        if json.loads(config.read_text(encoding="utf-8")).get("architectures") != ["CLIPTextModel"]:
            continue
        for weights in sorted(config.parent.glob("*.safetensors")):
            with safe_open(weights, "pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            if all(k.startswith(_PREFIX) for k in tensors):
                continue
            renamed = {(k if k.startswith(_PREFIX) else _PREFIX + k): v for k, v in tensors.items()}
            save_file(renamed, weights, metadata={**metadata, "format": "pt"})
            rewritten.append(weights)
        index = config.parent / "model.safetensors.index.json"
        if index.is_file():  # sharded: the index names every key too
            data = json.loads(index.read_text(encoding="utf-8"))
            data["weight_map"] = {
                (k if k.startswith(_PREFIX) else _PREFIX + k): v for k, v in data["weight_map"].items()
            }
            index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return rewritten
