"""sizes.py MODEL:STEPS:CFG ...: objects per image and the predicted size classes (small, medium, large) on
256 test captions, next to the real images'; then, for the captions naming one object and those naming two,
the share of images in which the evaluator finds 0, 1, 2, 3 and 4 or more objects."""

import collections
import sys

import torch

from turbokit.models import SHAPES_EVALUATOR
from turbokit.pipeline import TurboPipeline
from turbokit.recipes.evaluator import ShapesEvaluator, predict, render_split
from turbokit.recipes.shapes import parse_caption

torch.set_num_threads(1)
evaluator = ShapesEvaluator.load(SHAPES_EVALUATOR)
real, _, captions = render_split("test", 256, seed=0)
said = [len(parse_caption(c)["objects"]) for c in captions]


def show(name: str, predictions: list[dict]) -> None:
    sizes = collections.Counter(o["size"] for p in predictions for o in p["objects"])
    n = sum(sizes.values())
    shares = [round(sizes[k] / n, 2) for k in range(3)]
    found = {
        k: collections.Counter(min(len(p["objects"]), 4) for p, s in zip(predictions, said, strict=True) if s == k)
        for k in (1, 2)
    }
    counts = "; ".join(
        f"{k} said ({sum(c.values())}): found 0–4+ {[round(c[j] / sum(c.values()), 2) for j in range(5)]}"
        for k, c in found.items()
    )
    print(f"{name}: objects/img {n / len(predictions):.2f} size classes {shares}; {counts}", flush=True)


show("real", predict(evaluator, real))
for spec in sys.argv[1:]:
    model, steps, cfg = spec.split(":")
    pipe = TurboPipeline.from_pretrained(model)
    out = pipe(captions, steps=int(steps), guidance_scale=float(cfg), seed=list(range(256)))
    show(spec, predict(evaluator, out.pixels))
