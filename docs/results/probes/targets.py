"""Colours of the distillation targets on the issue's prompt: targets.py STUDENT TEACHER [T ...]

The student's 1-step images of "a red circle on a blue background" (seeds 0–15) are re-noised to each teacher
timestep t and given to the teacher; the evaluator then reads the colours of the NFSD target (as the main run
distils it, s = 7.5) and of the teacher's own one-step x̂₀ at CFG 3. Counts of images with a red object, of 16."""

import sys

import torch

from turbokit.distill.losses import NFSD_NEGATIVE_PROMPT, nfsd_target
from turbokit.models import SHAPES_EVALUATOR
from turbokit.pipeline import TurboPipeline
from turbokit.recipes.evaluator import ShapesEvaluator, predict
from turbokit.recipes.shapes import COLOURS
from turbokit.sampling import add_noise_vp, vp_coefficients, x0_from_output_vp

student_path, teacher_path = sys.argv[1], sys.argv[2]
times = [int(t) for t in sys.argv[3:]] or [100, 300, 500, 700, 900]
prompt, n = "a red circle on a blue background", 16
student = TurboPipeline.from_pretrained(student_path, dtype="fp32")
teacher = TurboPipeline.from_pretrained(teacher_path, dtype="fp32")
judge = ShapesEvaluator.load(SHAPES_EVALUATOR)
red = list(COLOURS).index("red")


def reds(latents: torch.Tensor) -> str:
    preds = predict(judge, teacher.decode(latents).cpu())
    found = [list(COLOURS)[o["colour"]] for p in preds for o in p["objects"]]
    hits = sum(any(o["colour"] == red for o in p["objects"]) for p in preds)
    return f"red {hits:2d}/{n} ({', '.join(sorted(set(found)))})"


x = student([prompt] * n, steps=1, guidance_scale=0.0, seed=list(range(n))).latents.float()
print(f"student x̂            {reds(x)}")
conds = [teacher.family.encode([p] * n) for p in (prompt, "", NFSD_NEGATIVE_PROMPT)]
gen = torch.Generator().manual_seed(0)
for t in times:
    steps = torch.full((n,), t)
    alpha, sigma = vp_coefficients(teacher.alphas_cumprod, steps)
    x_t = add_noise_vp(x, torch.randn(x.shape, generator=gen), alpha, sigma)
    size = teacher.native_size
    with torch.no_grad():
        eps = [
            teacher.unet(x_t, steps, encoder_hidden_states=c.embeds, **teacher.family.unet_kwargs(c, size, size)).sample
            for c in conds
        ]
    target = nfsd_target(x, *eps, steps, alpha, sigma)
    x0_cfg = x0_from_output_vp(x_t, eps[1] + 3.0 * (eps[0] - eps[1]), alpha, sigma, "epsilon")
    print(f"t={t:3d}  NFSD target {reds(target)}   teacher x̂₀ CFG 3 {reds(x0_cfg)}")
