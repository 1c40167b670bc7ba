"""grid.py OUT MODEL[:STEPS:CFG] ... — a row per model: 8 captions at seed 0, then the issue's prompt at seeds 0–7."""

import sys

from PIL import Image

from turbokit.pipeline import TurboPipeline

CAPTIONS = [
    "a red circle on a blue background",
    "a large yellow square in the center",
    "a small green star in the top left corner",
    "a blue heart at the bottom",
    "a purple triangle on the right on a white background",
    "an orange diamond to the left of a pink cross",
    "a brown hexagon above a red square on a gray background",
    "a large pink circle in the bottom right corner",
]
W = 64
specs = [[*spec.split(":"), "1", "0"][:3] for spec in sys.argv[2:]]
grid = Image.new("RGB", (W * 16, W * len(specs)), "white")
for row, (model, steps, cfg) in enumerate(specs):
    pipe = TurboPipeline.from_pretrained(model, dtype="fp32")
    images = pipe(CAPTIONS, steps=int(steps), guidance_scale=float(cfg), seed=[0] * 8).images
    images += pipe([CAPTIONS[0]] * 8, steps=int(steps), guidance_scale=float(cfg), seed=list(range(8))).images
    for col, image in enumerate(images):
        grid.paste(image, (col * W, row * W))
grid.save(sys.argv[1])
