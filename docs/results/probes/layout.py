"""layout.py [N]: how much of a real scene's layout the teacher's 8-step target keeps (img2img from
t ≈ strength × 1000, CFG 3, N test scenes), judged by the shipped evaluator."""

import sys

import torch
from PIL import Image

from turbokit.models import SHAPES_EVALUATOR
from turbokit.pipeline import TurboPipeline
from turbokit.recipes.evaluator import ShapesEvaluator, predict, render_split

torch.set_num_threads(1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
pipe = TurboPipeline.from_pretrained("build/recipe-shapes/teacher/model")
evaluator = ShapesEvaluator.load(SHAPES_EVALUATOR)
real, labels, captions = render_split("test", n, seed=0)
images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in real]


def score(predictions: list[dict]) -> str:
    kept = same_size = same_colour = total = 0
    for prediction, label in zip(predictions, labels, strict=True):
        cells = {o["position"]: o for o in prediction["objects"]}
        for said in label["objects"]:
            total += 1
            if (got := cells.get(said["position"])) is not None:
                kept += 1
                same_size += got["size"] == said["size"]
                same_colour += got["colour"] == said["colour"]
    objects = sum(len(p["objects"]) for p in predictions)
    return (
        f"cell kept {kept / total:.2f} size|kept {same_size / max(kept, 1):.2f} "
        f"colour|kept {same_colour / max(kept, 1):.2f} objects/img {objects / len(predictions):.2f}"
    )


print("real          ", score(predict(evaluator, real)), flush=True)
for strength in (0.2, 0.4, 0.6, 0.8, 0.95):
    steps = max(8, round(8 / strength))  # int(steps × strength) = 8 steps from t ≈ strength × 1000
    out = pipe(captions, image=images, strength=strength, steps=steps, guidance_scale=3.0, seed=list(range(n)))
    print(f"strength {strength:.2f}", score(predict(evaluator, out.pixels)), flush=True)
