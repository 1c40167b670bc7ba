"""sizes.py MODEL:STEPS:CFG ...: objects per image and the predicted size classes (small, medium, large) on
256 test captions, next to the real images'."""

import collections
import sys

import torch

from turbokit.models import SHAPES_EVALUATOR
from turbokit.pipeline import TurboPipeline
from turbokit.recipes.evaluator import ShapesEvaluator, predict, render_split

torch.set_num_threads(1)
evaluator = ShapesEvaluator.load(SHAPES_EVALUATOR)
real, _, captions = render_split("test", 256, seed=0)


def show(name: str, predictions: list[dict]) -> None:
    sizes = collections.Counter(o["size"] for p in predictions for o in p["objects"])
    n = sum(sizes.values())
    shares = [round(sizes[k] / n, 2) for k in range(3)]
    print(f"{name}: objects/img {n / len(predictions):.2f} size classes {shares}", flush=True)


show("real", predict(evaluator, real))
for spec in sys.argv[1:]:
    model, steps, cfg = spec.split(":")
    pipe = TurboPipeline.from_pretrained(model)
    out = pipe(captions, steps=int(steps), guidance_scale=float(cfg), seed=list(range(256)))
    show(spec, predict(evaluator, out.pixels))
