"""`turbokit eval`: one row of the `shapes` quality study (issue 4 §4) for a model at a number of steps.

The model generates one image per caption of the `test` split (captions 0 … N−1, image i with seed i) and
of the `heldout` split (the shape–colour pairs no training stage saw); the separately trained evaluator
(`turbokit.recipes.evaluator`) gives FID in its feature space against the real test images, prompt
alignment, per-attribute accuracy and held-out alignment. Rows are appended to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from turbokit.errors import TurbokitError
from turbokit.models import SHAPES_EVALUATOR
from turbokit.recipes.evaluator import (
    ShapesEvaluator,
    alignment,
    evaluate_images,
    extract_features,
    predict,
    render_split,
)


def generate(pipe: Any, captions: list[str], steps: int, guidance: float, batch_size: int, first_seed: int = 0):
    """Images for `captions` (image i with seed first_seed + i), as a uint8 (N, 3, H, W) tensor, and the
    generation wall time in seconds."""
    chunks, started = [], time.perf_counter()
    for start in range(0, len(captions), batch_size):
        batch = captions[start : start + batch_size]
        result = pipe(
            batch, steps=steps, guidance_scale=guidance, seed=[first_seed + start + k for k in range(len(batch))]
        )
        chunks.append((result.pixels.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(chunks), time.perf_counter() - started


def evaluate_model(
    pipe: Any,
    evaluator: ShapesEvaluator,
    steps: int,
    guidance: float = 0.0,
    images: int = 2000,
    heldout_images: int = 500,
    batch_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """One study row: FID, alignment, per-attribute accuracy, held-out alignment and seconds per image."""
    real, _, captions = render_split("test", images, seed=seed)
    generated, seconds = generate(pipe, captions, steps, guidance, batch_size)
    row = evaluate_images(evaluator, generated, captions, extract_features(evaluator, real))
    if heldout_images:
        _, _, heldout_captions = render_split("heldout", heldout_images, seed=seed)
        heldout, _ = generate(pipe, heldout_captions, steps, guidance, batch_size, first_seed=images)
        predictions = predict(evaluator, heldout)
        row["heldout_alignment"] = (
            sum(alignment(p, c) for p, c in zip(predictions, heldout_captions, strict=True)) / heldout_images
        )
    row.update(
        steps=steps, guidance=guidance, images=images, heldout_images=heldout_images, seconds_per_image=seconds / images
    )
    return row


def labelled_row(name: str, model: str | Path, pipe: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """A study row: its label, the model, the precision it ran in, then `evaluate_model`'s figures."""
    return {"name": name, "model": str(model), "dtype": str(pipe.precision.compute).removeprefix("torch."), **metrics}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model to evaluate (a diffusers folder or .safetensors file)")
    parser.add_argument(
        "--evaluator",
        default=str(SHAPES_EVALUATOR),
        help="folder of a trained shapes evaluator (default: the one shipped with turbokit)",
    )
    parser.add_argument("--steps", default="1", help="comma-separated step counts, one row each (default: 1)")
    parser.add_argument("--guidance", type=float, default=0.0, help="CFG scale (default: 0, as Turbo models run)")
    parser.add_argument("--images", type=int, default=2000, help="test captions, one image each (default: 2000)")
    parser.add_argument("--heldout-images", type=int, default=500, help="held-out-pair captions (default: 500)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--name", default=None, help="row label (default: the model folder's name)")
    parser.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0, help="dataset seed of the captions (default: 0)")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from turbokit.pipeline import TurboPipeline

    try:
        steps = [int(s) for s in str(args.steps).split(",")]
    except ValueError:
        raise TurbokitError(f"--steps takes whole numbers separated by commas, not {args.steps!r}") from None
    if not all(s >= 1 for s in steps) or args.images < 2 or args.heldout_images < 0 or args.batch_size < 1:
        raise TurbokitError("--steps must be ≥ 1, --images ≥ 2, --heldout-images ≥ 0 and --batch-size ≥ 1")
    evaluator = ShapesEvaluator.load(args.evaluator)
    pipe = TurboPipeline.from_pretrained(
        args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype
    )
    rows = []
    for n in steps:
        row = labelled_row(
            args.name or Path(args.model).name,
            args.model,
            pipe,
            evaluate_model(
                pipe, evaluator, n, args.guidance, args.images, args.heldout_images, args.batch_size, args.seed
            ),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    return rows
