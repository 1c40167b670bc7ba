"""Recipe stage `vae`: a small diffusers `AutoencoderKL` for 64×64 `shapes` images.

A 4× autoencoder (three levels, 32–64 channels, 4 latent channels → 16×16×4 latents): `shapes` scenes
are flat colours with sharp edges, so an L1 + L2 + small-KL objective, weighted towards the objects,
reconstructs them without the perceptual or adversarial losses SD's VAE needs (bf16 autocast where the CPU
has it natively). At the end the latents' scaling factor is set to 1/std of held-out latents, as SD does, so
the diffusion stages see unit-variance latents.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from turbokit import metrics
from turbokit.precision import cpu_has_native_bf16
from turbokit.recipes.training import StageRun, finished, set_lr, shapes_batch, step_generator, warmup_cosine

OBJECT_WEIGHT = 10.0
KL_WEIGHT = 1e-7  # on the per-image KL sum: keeps latents near unit scale, costs no detail


def build_vae(size: int = 64) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=size,
    )


def object_weights(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) loss weights: OBJECT_WEIGHT on pixels that differ from the background, 1 elsewhere.
    Objects cover a few percent of a scene, so an unweighted loss is nearly all background and leaves
    small objects blurred and off-colour (measured: a red cross decoded orange). The background is each
    image's median colour, which it always is: objects never cover half of the image."""
    background = pixels.flatten(2).median(dim=2).values[..., None, None]
    return 1 + (OBJECT_WEIGHT - 1) * ((pixels - background).abs().amax(1, keepdim=True) > 0.05).float()


def vae_loss(
    vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator, autocast: bool = True
) -> dict[str, torch.Tensor]:
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        posterior = vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample.float()
    weights = object_weights(pixels)
    l1 = ((reconstruction - pixels).abs() * weights).mean() / weights.mean()
    l2 = ((reconstruction - pixels).square() * weights).mean() / weights.mean()
    kl = posterior.kl().float().mean()  # summed over the latent, averaged over the batch
    return {"loss": l1 + l2 + KL_WEIGHT * kl, "l1": l1, "l2": l2, "kl": kl}


@torch.no_grad()
def psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """PSNR (dB, images in [0, 1]) of the mean-latent reconstruction."""
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return float(metrics.psnr((reconstruction + 1) / 2, (pixels + 1) / 2).mean())


def train_vae(
    folder: str | Path,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> AutoencoderKL:
    """Train (or resume, or load a finished) VAE in `folder`; the finished model is `folder/vae` (diffusers)."""
    folder = Path(folder)
    if finished(folder):
        return AutoencoderKL.from_pretrained(folder / "vae")
    torch.manual_seed(seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    run = StageRun(folder, {"vae": vae}, optimizer, steps, label="vae")
    run.resume()
    bf16 = cpu_has_native_bf16()
    vae.train()
    for step in run.steps(progress=progress):
        set_lr(optimizer, lr, warmup_cosine(step, steps, 50))
        pixels, _ = shapes_batch("train", step, batch_size, seed=seed)
        losses = vae_loss(vae, pixels, step_generator(seed, step), autocast=bf16)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        run.log(**{k: v.item() for k, v in losses.items()})
    vae.eval()
    # held-out scenes (the test split) for the scaling factor and the reported PSNR
    pixels, _ = shapes_batch("test", 0, 256, seed=seed)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(folder / "vae")
    run.finish(
        {
            "steps": steps,
            "batch_size": batch_size,
            "test_psnr_db": psnr(vae, pixels[:64]),
            "scaling_factor": vae.config.scaling_factor,
        }
    )
    return vae
