"""sizes.py MODEL:STEPS:CFG ...: objects per image and the predicted size classes (small, medium, large) on
256 test captions, next to the real images'; then, for the captions naming one object and those naming two,
the share of images in which the evaluator finds 0, 1, 2, 3 and 4 or more objects, and how often every object
found for a one-object caption has the colour it names."""

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
named = [parse_caption(c)["objects"] for c in captions]
said = [len(objects) for objects in named]


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
    # one object named, several found: are the extra ones pieces of it (its colour) or other objects?
    several = [(p, o[0]) for p, o in zip(predictions, named, strict=True) if len(o) == 1 and len(p["objects"]) > 1]
    same = sum(all(x["colour"] == o["colour"] for x in p["objects"]) for p, o in several) / max(len(several), 1)
    print(
        f"{name}: objects/img {n / len(predictions):.2f} size classes {shares}; {counts}; "
        f"one named, several found ({len(several)}): all in the named colour {same:.2f}",
        flush=True,
    )


show("real", predict(evaluator, real))
for spec in sys.argv[1:]:
    model, steps, cfg = spec.split(":")
    pipe = TurboPipeline.from_pretrained(model)
    out = pipe(captions, steps=int(steps), guidance_scale=float(cfg), seed=list(range(256)))
    show(spec, predict(evaluator, out.pixels))
