"""vaeceiling.py VAE [N]: the evaluator's scores on N real test images (default 500) and on the same images
passed through the VAE (encoded to the latent mean, decoded) — the best any latent model on that VAE can score."""

import sys

import torch
from diffusers import AutoencoderKL

from turbokit.models import SHAPES_EVALUATOR
from turbokit.recipes.evaluator import ShapesEvaluator, alignment, per_attribute_accuracy, predict, render_split

n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
evaluator = ShapesEvaluator.load(SHAPES_EVALUATOR)
real, _, captions = render_split("test", n)
vae = AutoencoderKL.from_pretrained(sys.argv[1]).float().eval()
with torch.no_grad():
    rebuilt = torch.cat(
        [
            ((vae.decode(vae.encode(b.float() / 127.5 - 1).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5)
            .round()
            .to(torch.uint8)
            for b in real.split(100)
        ]
    )
psnr = 10 * torch.log10(255**2 / ((rebuilt.float() - real.float()) ** 2).mean())
print(f"PSNR {psnr:.1f} dB over {n} test images")
for name, images in (("real", real), ("through the VAE", rebuilt)):
    predictions = predict(evaluator, images)
    aligned = sum(alignment(p, c) for p, c in zip(predictions, captions, strict=True)) / n
    accuracy = {k: round(v, 3) for k, v in per_attribute_accuracy(predictions, captions).items()}
    print(f"{name}: alignment {aligned:.3f} {accuracy}")
