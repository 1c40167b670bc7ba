"""FID split into its mean and covariance terms: fid_parts.py STEPS [--seed N] MODEL[:CFG] [MODEL[:CFG] ...]

The same 2000 test captions and seeds as `turbokit eval` (`--seed 1`: 2000 other captions, a validation set
for choosing among a run's exports without looking at the test captions); prints ‖μg − μr‖² and the covariance term
tr(Σg + Σr − 2(ΣgΣr)^½), whose sum is the row's FID, so a model's distance from the real images can be read
as a shift of the average image (colour, ground, object size) or as a wrong spread (too little variety, or the
wrong kind)."""

import argparse

import numpy as np

from turbokit.models import SHAPES_EVALUATOR
from turbokit.pipeline import TurboPipeline
from turbokit.recipes.evaluator import ShapesEvaluator, extract_features, gaussian_frechet_distance, render_split
from turbokit.recipes.study import generate

parser = argparse.ArgumentParser(description="each model's FID split into its mean and covariance terms")
parser.add_argument("steps", type=int)
parser.add_argument("--seed", type=int, default=0, help="dataset seed of the captions (1: a validation set)")
parser.add_argument("models", nargs="+", metavar="MODEL[:CFG]")
args = parser.parse_args()
steps, seed, models = args.steps, args.seed, args.models
evaluator = ShapesEvaluator.load(SHAPES_EVALUATOR)
real, _, captions = render_split("test", 2000, seed=seed)
r = extract_features(evaluator, real).astype(np.float64)
mu_r, cov_r = r.mean(0), np.cov(r, rowvar=False)
for spec in models:
    model, _, cfg = spec.partition(":")
    pipe = TurboPipeline.from_pretrained(model, dtype="fp32")
    g = extract_features(evaluator, generate(pipe, captions, steps, float(cfg or 0), 100)[0]).astype(np.float64)
    mu_g, cov_g = g.mean(0), np.cov(g, rowvar=False)
    fid = gaussian_frechet_distance(mu_g, cov_g, mu_r, cov_r)
    mean_term = float((mu_g - mu_r) @ (mu_g - mu_r))
    print(
        f"{spec} steps={steps} seed={seed}: FID {fid:.0f} = mean {mean_term:.0f} + covariance {fid - mean_term:.0f}; "
        f"tr Σg {np.trace(cov_g):.0f}, tr Σr {np.trace(cov_r):.0f}",
        flush=True,
    )
