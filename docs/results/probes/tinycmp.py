"""tinycmp.py TINY_VAE ...: tiny decoders on the shipped student's 1-step latents, against its full VAE.

PSNR of each tiny decoder's images against the full VAE's from the same latents, and the evaluator's scores,
on tests/test_models.py's 24 prompts and on 256 test captions (seeds 0…N−1)."""

import sys

import torch

sys.path.insert(0, "tests")
from test_models import PROMPTS

from turbokit import metrics
from turbokit.models import SHAPES_EVALUATOR, SHAPES_TURBO
from turbokit.pipeline import TurboPipeline
from turbokit.recipes.evaluator import ShapesEvaluator, per_attribute_accuracy, predict
from turbokit.recipes.training import shapes_batch


def rounded(scores: dict) -> dict:
    return {k: round(v, 3) for k, v in scores.items()}


evaluator = ShapesEvaluator.load(SHAPES_EVALUATOR)
full = TurboPipeline.from_pretrained(SHAPES_TURBO)
_, test_captions = shapes_batch("test", 0, 256, seed=0)
for label, prompts in (("24 test_models prompts", PROMPTS * 4), ("256 test captions", list(test_captions))):
    latents = full(prompts, steps=1, seed=list(range(len(prompts))), decode=False).latents
    with torch.no_grad():
        reference = full.decode(latents).cpu()
    print(label, "full VAE", rounded(per_attribute_accuracy(predict(evaluator, reference), prompts)))
    for path in sys.argv[1:]:
        tiny = TurboPipeline.from_pretrained(SHAPES_TURBO, tiny_vae=path)
        with torch.no_grad():
            fast = tiny.decode(latents).cpu()
        psnr = metrics.psnr(fast, reference)
        scores = rounded(per_attribute_accuracy(predict(evaluator, fast), prompts))
        print(label, path, f"PSNR median {psnr.median():.2f} worst {psnr.min():.2f} dB", scores)
