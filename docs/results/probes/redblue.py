"""Red objects / blue grounds on the issue's prompt, 16 seeds: redblue.py MODEL STEPS GUIDANCE"""

import sys

from turbokit.models import SHAPES_EVALUATOR
from turbokit.pipeline import TurboPipeline
from turbokit.recipes.evaluator import ShapesEvaluator, predict
from turbokit.recipes.shapes import BACKGROUNDS, COLOURS

model, steps, guidance = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pipe = TurboPipeline.from_pretrained(model, dtype="fp32")
prompts = ["a red circle on a blue background"] * 16
pixels = pipe(prompts, steps=steps, guidance_scale=guidance, seed=list(range(16))).pixels
preds = predict(ShapesEvaluator.load(SHAPES_EVALUATOR), pixels)
blue = sum(p["background"] == list(BACKGROUNDS).index("blue") for p in preds)
red = sum(any(o["colour"] == list(COLOURS).index("red") for o in p["objects"]) for p in preds)
cols = [list(COLOURS)[o["colour"]] for p in preds for o in p["objects"]]
print(f"{model} steps={steps} cfg={guidance}: blue {blue}/16 red {red}/16 colours {cols}")
