"""An evaluator network for the `shapes` dataset, and the metrics it gives (issue 4 §4).

"An evaluator network trained separately on real synthetic images — never used by any training stage —
gives: FID in its feature space, prompt alignment (every attribute in the caption predicted correctly),
per-attribute accuracy, and alignment on the held-out pairs; at least 2000 images per row, fixed seeds."

The network reads a 64×64 image and predicts, for each cell of the 3×3 grid, whether an object is there
and its shape, colour and size, plus the background: one- and two-object scenes look the same to it, and
an object's position is the cell it is predicted in. Its penultimate embedding is the feature space FID is
measured in. Train and report with `python -m turbokit.recipes.evaluator --samples 20000 --steps 2500 --out PATH`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from turbokit.errors import TurbokitError
from turbokit.recipes.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    example,
    parse_caption,
    relations_between,
    render,
)

IMAGE_SIZE = 64
CELLS = len(POSITIONS)
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")
_CLASSES = {"shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}
_CELL_LOGITS = 1 + sum(_CLASSES.values())  # occupancy, then shape, colour and size logits

Images = torch.Tensor | Sequence[Image.Image]
"""A float (N, 3, H, W) tensor in [0, 1], a uint8 one in [0, 255], or a list of PIL images."""


# ---------------------------------------------------------------------------------------------- the network


class ShapesEvaluator(nn.Module):
    """A small CNN: four conv stages (64 → 8 pixels), average-pooled to one vector per cell of the 3×3 grid,
    then the same small head on every cell — a `cell_dim` embedding, then occupancy, shape, colour and size
    logits — so all nine cells train one head. The nine embeddings together are the FID features."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96, 128), cell_dim: int = 32) -> None:
        super().__init__()
        self.config = {"channels": list(channels), "cell_dim": cell_dim}
        layers: list[nn.Module] = []
        width = 3
        for k, out in enumerate(channels):
            stride = 1 if k == len(channels) - 1 else 2  # the last stage keeps 8×8, finer than the grid
            layers += [nn.Conv2d(width, out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.trunk = nn.Sequential(*layers)
        self.cell_embed = nn.Sequential(nn.Conv2d(width, cell_dim, 1), nn.ReLU())
        self.cell_head = nn.Conv2d(cell_dim, _CELL_LOGITS, 1)
        self.background_head = nn.Linear(width, len(BACKGROUNDS))

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images * 2 - 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The (N, 9 × cell_dim) penultimate embedding of (N, 3, 64, 64) images in [0, 1]."""
        return self.cell_embed(F.adaptive_avg_pool2d(self._trunk(images), 3)).flatten(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 9, 1 + 8 + 8 + 3) cell logits — occupancy, shape, colour, size — and (N, 4) background logits."""
        trunk = self._trunk(images)
        cells = self.cell_head(self.cell_embed(F.adaptive_avg_pool2d(trunk, 3)))  # (N, logits, 3, 3)
        return cells.flatten(2).transpose(1, 2), self.background_head(trunk.mean((2, 3)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, path: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into the folder `path`."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, root / "model.safetensors")
        return root

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ShapesEvaluator:
        """The evaluator `save` wrote into `path`, in eval mode."""
        root = Path(path)
        if not (root / "config.json").is_file() or not (root / "model.safetensors").is_file():
            raise TurbokitError(
                f"no evaluator in {root}: expected config.json and model.safetensors "
                "(train one with python -m turbokit.recipes.evaluator --out PATH)"
            )
        evaluator = cls(**json.loads((root / "config.json").read_text(encoding="utf-8")))
        evaluator.load_state_dict(load_file(root / "model.safetensors"))
        return evaluator.to(device).eval()


def as_batch(images: Images) -> torch.Tensor:
    """`images` as a float (N, 3, 64, 64) tensor in [0, 1]; other sizes are resized (antialiased bilinear)."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)
    batch = images / 255.0 if images.dtype == torch.uint8 else images.float()
    if batch.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        batch = F.interpolate(batch, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return batch


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield as_batch(images[start : start + batch_size])


@torch.no_grad()
def extract_features(evaluator: ShapesEvaluator, images: Images, batch_size: int = 256) -> np.ndarray:
    """The (N, D) float64 FID features of `images`."""
    evaluator.eval()
    chunks = [evaluator.features(batch.to(evaluator.device)).double().cpu() for batch in _batches(images, batch_size)]
    return torch.cat(chunks).numpy()


@torch.no_grad()
def predict(evaluator: ShapesEvaluator, images: Images, batch_size: int = 256) -> list[dict[str, Any]]:
    """What each image shows, in `Scene.labels()`'s form: one object per cell predicted occupied, in cell
    order. `relation` is None — a set of objects has no "first" — and `alignment` derives relations from cells."""
    evaluator.eval()
    predictions = []
    for batch in _batches(images, batch_size):
        cells, background = evaluator(batch.to(evaluator.device))
        cells, background = cells.cpu(), background.argmax(-1).tolist()
        shape, colour, size = (
            logits.argmax(-1).tolist() for logits in cells[..., 1:].split(list(_CLASSES.values()), dim=-1)
        )
        for n, occupied in enumerate((cells[..., 0] > 0).tolist()):
            objects = [
                {"shape": shape[n][p], "colour": colour[n][p], "size": size[n][p], "position": p}
                for p in range(CELLS)
                if occupied[p]
            ]
            predictions.append({"background": background[n], "relation": None, "objects": objects})
    return predictions


# ---------------------------------------------------------------------------------------------- training


def render_split(split: str, count: int, start: int = 0, seed: int = 0) -> tuple[torch.Tensor, list[dict], list[str]]:
    """Samples `start … start + count − 1` of a `shapes` split: uint8 (N, 3, 64, 64) images, labels, captions."""
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels, captions = [], []
    for n in range(count):
        scene, text = example(split, start + n, seed)
        images[n] = np.asarray(render(scene, IMAGE_SIZE))
        labels.append(scene.labels())
        captions.append(text)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, captions


def _targets(labels: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 9, 4) per-cell targets — occupied, shape, colour, size; −100 (ignored) where empty — and (N,) backgrounds."""
    cells = torch.full((len(labels), CELLS, 4), -100, dtype=torch.long)
    cells[..., 0] = 0
    for n, label in enumerate(labels):
        for o in label["objects"]:
            cells[n, o["position"]] = torch.tensor([1, o["shape"], o["colour"], o["size"]])
    return cells, torch.tensor([label["background"] for label in labels])


def evaluator_loss(evaluator: ShapesEvaluator, images: torch.Tensor, cells: torch.Tensor, background: torch.Tensor):
    """Binary cross-entropy on occupancy, plus cross-entropy on each occupied cell's shape, colour and size
    and on the background."""
    cell_logits, background_logits = evaluator(images)
    loss = F.binary_cross_entropy_with_logits(cell_logits[..., 0], cells[..., 0].float())
    for k, logits in enumerate(cell_logits[..., 1:].split(list(_CLASSES.values()), dim=-1), start=1):
        loss = loss + F.cross_entropy(logits.flatten(0, 1), cells[..., k].flatten(), ignore_index=-100)
    return loss + F.cross_entropy(background_logits, background)


def train_evaluator(
    num_samples: int = 20000,
    steps: int = 2500,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ShapesEvaluator:
    """Train an evaluator on the first `num_samples` scenes of the `evaluator` split — every shape–colour
    pair, held-out ones included, since it must judge them (rendered once, in memory),
    `steps` AdamW steps with a cosine learning rate, batches reshuffled each epoch from `seed`."""
    if num_samples < batch_size or steps < 1:
        raise TurbokitError(f"need at least one batch of samples ({num_samples} < {batch_size}) and one step")
    started = time.perf_counter()
    images, labels, _ = render_split("evaluator", num_samples, seed=seed)
    cells, background = _targets(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        evaluator = ShapesEvaluator().to(device).train()
    optimizer = torch.optim.AdamW(evaluator.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    order, generator = torch.empty(0, dtype=torch.long), torch.Generator().manual_seed(seed)
    for step in range(steps):
        if len(order) < batch_size:
            order = torch.randperm(num_samples, generator=generator)
        index, order = order[:batch_size], order[batch_size:]
        loss = evaluator_loss(
            evaluator, as_batch(images[index]).to(device), cells[index].to(device), background[index].to(device)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step % 200 == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return evaluator.eval()


# ---------------------------------------------------------------------------------------------- metrics


def _reference(caption_or_labels: str | dict[str, Any]) -> dict[str, Any]:
    return parse_caption(caption_or_labels) if isinstance(caption_or_labels, str) else caption_or_labels


def _agreement(said: dict[str, Any], predicted: dict[str, Any] | None) -> dict[str, bool]:
    """For each attribute `said` states (not None), whether `predicted` (None: a missing object) has it."""
    return {a: predicted is not None and predicted[a] == said[a] for a in OBJECT_ATTRIBUTES if said[a] is not None}


def _matchings(said: list[dict], predicted: list[dict]) -> Iterator[tuple[dict | None, ...]]:
    """Every way of giving each said object its own predicted object (None once the predictions run out)."""
    padded = predicted + [None] * max(0, len(said) - len(predicted))
    return itertools.permutations(padded, len(said))


def _best_matching(said: list[dict], predicted: list[dict]) -> tuple[dict | None, ...]:
    """The matching that agrees on the most stated attributes (the first such, so ties are deterministic)."""
    return max(
        _matchings(said, predicted),
        key=lambda m: sum(sum(_agreement(s, p).values()) for s, p in zip(said, m, strict=True)),
    )


def alignment(prediction: dict[str, Any], caption_or_labels: str | dict[str, Any]) -> bool:
    """Whether an image shows what its caption says (issue 4 §4): as many objects as the caption names,
    each with every attribute it states (its size and position only when said), the background when
    said, and the relation when said, derived from the predicted objects' cells."""
    reference = _reference(caption_or_labels)
    said, predicted = reference["objects"], prediction["objects"]
    if len(predicted) != len(said):
        return False
    if reference["background"] is not None and prediction["background"] != reference["background"]:
        return False
    for matching in _matchings(said, predicted):
        if not all(all(_agreement(s, p).values()) for s, p in zip(said, matching, strict=True)):
            continue
        if reference["relation"] is None or (
            RELATIONS[reference["relation"]] in relations_between(matching[0]["position"], matching[1]["position"])
        ):
            return True
    return False


def per_attribute_accuracy(
    predictions: Sequence[dict[str, Any]], references: Sequence[str | dict[str, Any]]
) -> dict[str, float]:
    """The fraction of stated attributes predicted correctly: `count` (number of objects), `background`,
    and over every stated object `shape`, `colour`, `size`, `position` (each said object is paired with
    the predicted object agreeing with it most; a missing one is wrong). NaN for an attribute never stated."""
    correct = dict.fromkeys(("count", "background", *OBJECT_ATTRIBUTES), 0)
    stated = dict.fromkeys(correct, 0)
    for prediction, reference in zip(predictions, map(_reference, references), strict=True):
        said = reference["objects"]
        stated["count"] += 1
        correct["count"] += len(prediction["objects"]) == len(said)
        if reference["background"] is not None:
            stated["background"] += 1
            correct["background"] += prediction["background"] == reference["background"]
        for s, p in zip(said, _best_matching(said, prediction["objects"]), strict=True):
            for attribute, right in _agreement(s, p).items():
                stated[attribute] += 1
                correct[attribute] += right
    return {a: correct[a] / stated[a] if stated[a] else math.nan for a in correct}


def gaussian_frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), the Fréchet distance between two Gaussians (Heusel et al. 2017).

    tr (Σa Σb)^½ is computed as Σ √λ over the eigenvalues λ of the symmetric S Σb S, S = Σa^½ from `eigh`:
    it has the same eigenvalues as Σa Σb, but a symmetric eigen-solver needs no complex `sqrtm` and no
    diagonal offset for singular covariances (fewer samples than dimensions). Eigenvalues that rounding
    makes slightly negative are clipped to 0, in float64 throughout."""
    values, vectors = np.linalg.eigh(np.atleast_2d(cov_a).astype(np.float64))
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_root = np.sqrt(np.linalg.eigvalsh(root_a @ np.atleast_2d(cov_b) @ root_a).clip(min=0)).sum()
    difference = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
    return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """FID between two (N, D) feature sets: the Fréchet distance of Gaussians with their means and
    (unbiased) covariances."""
    moments = []
    for features in (features_a, features_b):
        x = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise TurbokitError(f"FID needs (N, D) features with N ≥ 2, not shape {x.shape}")
        moments += [x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))]
    return gaussian_frechet_distance(*moments)


def evaluate_images(
    evaluator: ShapesEvaluator,
    images: Images,
    captions: Sequence[str | dict[str, Any]],
    reference_features: np.ndarray,
) -> dict[str, float]:
    """One row of issue 4 §4's table for `images` generated from `captions`: `fid` against the features
    of real images, `alignment` (the fraction of images showing everything their caption says) and the
    per-attribute accuracies."""
    if len(images) != len(captions):
        raise TurbokitError(f"{len(images)} images but {len(captions)} captions: give one caption per image")
    predictions = predict(evaluator, images)
    return {
        "fid": frechet_distance(extract_features(evaluator, images), reference_features),
        "alignment": float(np.mean([alignment(p, c) for p, c in zip(predictions, captions, strict=True)])),
        **per_attribute_accuracy(predictions, captions),
    }


# ---------------------------------------------------------------------------------------------- the command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the shapes evaluator and report its accuracy (issue 4 §4).")
    parser.add_argument("--samples", type=int, default=20000, help="train-split scenes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--eval-images", type=int, default=2000, help="images per reported row (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument("--out", required=True, help="folder to save the evaluator and report.json in")
    args = parser.parse_args(argv)
    try:
        evaluator = train_evaluator(args.samples, args.steps, args.batch_size, seed=args.seed, device=args.device)
        evaluator.save(args.out)
        n = args.eval_images
        report: dict[str, Any] = {"args": vars(args)}
        for split in ("test", "heldout"):
            images, labels, captions = render_split(split, n, seed=args.seed)
            predictions = predict(evaluator, images)
            report[split] = {
                "alignment_labels": float(
                    np.mean([alignment(p, label) for p, label in zip(predictions, labels, strict=True)])
                ),
                "alignment_captions": float(
                    np.mean([alignment(p, c) for p, c in zip(predictions, captions, strict=True)])
                ),
                **per_attribute_accuracy(predictions, labels),
            }
        real_a, _, _ = render_split("test", n, seed=args.seed)
        real_b, _, _ = render_split("test", n, start=n, seed=args.seed)
        report["fid_test_vs_test"] = frechet_distance(
            extract_features(evaluator, real_a), extract_features(evaluator, real_b)
        )
    except TurbokitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
