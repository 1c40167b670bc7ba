"""Recipe stage `teacher`: a many-step text-to-image model on `shapes`, the teacher ADD distils.

A diffusers `UNet2DConditionModel` in SD 2.x's conventions (linear attention projections, 64-wide
cross-attention to the CLIP text states of `turbokit.recipes.clip`), ε-prediction on the
scaled_linear β schedule with 1000 steps, as SD trains, with offset noise and Min-SNR-γ weighting;
10% of captions are dropped so that classifier-free guidance works. Trained in bf16 autocast (fp32 on a CPU
without native bf16, where it would be emulated) with fp32 weights and an EMA, which is what is kept. The
result is an ordinary SD 2.x diffusers folder:
`turbokit generate -m teacher`, diffusers' `StableDiffusionPipeline` and
`turbokit distill --pretrained_teacher_model` all load it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from turbokit.compat import save_pretrained
from turbokit.configs import turbo_config_dir
from turbokit.precision import cpu_has_native_bf16
from turbokit.recipes.training import (
    StageRun,
    finished,
    set_lr,
    shapes_batch,
    step_generator,
    update_ema,
    warmup_cosine,
)

CAPTION_DROPOUT = 0.1
# The text encoder's learning rate relative to the UNet's. At 0.2 teacher v4's encoder kept damping position
# words ~25-fold (and the hard-negative CLIP of the text stage still does): the diffusion loss, the one signal
# that needs position, must be able to move it (docs/results.md).
TEXT_LR_RATIO = 1.0
# Offset noise (diffusers' `--noise_offset`): at t = 999 scaled_linear keeps √ᾱ = 0.068 of the image, and
# on `shapes` the background moves a latent's per-channel mean by ±1, so a teacher trained on plain noise
# read the background off its input there, and sampled from pure noise it painted every background grey.
NOISE_OFFSET = 0.1
# Min-SNR-γ (diffusers' `--snr_gamma`): with uniform t and plain ε-MSE the t < 250 band, where the caption
# hardly matters, made ~70% of the loss of the offset-noise teacher, which learned colour and background
# but drew every shape as a blob in roughly the wrong place (docs/results.md).
SNR_GAMMA = 5.0


def build_unet(latent_size: int = 16, cross_attention_dim: int = 64) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        # text at every level: objects are 2–4 latent pixels wide, and a first teacher that attended to
        # text only at 8×8 and 4×4 learned an almost unconditional model (text lowered its loss by 4%)
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 4),  # heads per level (diffusers' SD 2.x naming): 32-wide heads
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=32,
    )


def noise_schedule() -> DDPMScheduler:
    """SD's training schedule: scaled_linear β from 0.00085 to 0.012, 1000 steps, ε-prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


def encode_text(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


def teacher_loss(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_states: torch.Tensor,
    pixels: torch.Tensor,
    generator: torch.Generator,
    schedule: DDPMScheduler,
    autocast: bool = True,
    noise_offset: float = NOISE_OFFSET,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """ε-MSE at uniform t; with `snr_gamma`, Min-SNR-γ weighted (Hang et al. 2023): each sample's loss
    × min(SNR, γ)/SNR, shrinking the low-noise steps that dominate plain ε-MSE and say little of the caption."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        latents = latents.float() * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = schedule.add_noise(latents, noise, timesteps)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        prediction = unet(noisy, timesteps, text_states).sample
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), noise)
    alphas = schedule.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    return (weight * F.mse_loss(prediction.float(), noise, reduction="none").mean((1, 2, 3))).mean()


def train_teacher(
    folder: str | Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    steps: int = 3500,
    batch_size: int = 64,
    lr: float = 5e-4,
    ema_decay: float = 0.999,
    seed: int = 0,
    progress: bool = True,
    snr_gamma: float | None = SNR_GAMMA,
) -> Path:
    """Train (or resume) the teacher in `folder`; writes and returns the diffusers folder `folder/model`."""
    folder = Path(folder)
    if finished(folder):
        return folder / "model"
    torch.manual_seed(seed)
    unet = build_unet(
        latent_size=vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1),
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    # The text encoder trains with the UNet, slower: frozen, the contrastive encoder's token states left
    # the first teacher nearly blind to its captions. Its EMA ships with the UNet's.
    text_ema = copy.deepcopy(text_encoder).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [{"params": unet.parameters(), "lr": lr}, {"params": text_encoder.parameters(), "lr": lr * TEXT_LR_RATIO}],
        weight_decay=0.0,
    )
    run = StageRun(
        folder,
        {"unet": unet, "ema": ema, "text": text_encoder, "text_ema": text_ema},
        optimizer,
        steps,
        label="teacher",
    )
    run.resume()
    vae.eval().requires_grad_(False)
    text_encoder.train().requires_grad_(True)
    schedule = noise_schedule()
    bf16 = cpu_has_native_bf16()
    unet.train()
    for step in run.steps(progress=progress):
        set_lr(optimizer, (lr, lr * TEXT_LR_RATIO), warmup_cosine(step, steps, 200))
        generator = step_generator(seed, step)
        pixels, captions = shapes_batch("train", step, batch_size, seed=seed + 2)
        drop = torch.rand(len(captions), generator=generator) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        states = encode_text(text_encoder, tokenizer, captions)
        loss = teacher_loss(unet, vae, states, pixels, generator, schedule, autocast=bf16, snr_gamma=snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        update_ema(ema, unet, decay)
        update_ema(text_ema, text_encoder, decay)
        run.log(loss=loss.item())
    save_pipeline(folder / "model", ema, vae, text_ema.eval(), tokenizer)
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "text_lr_ratio": TEXT_LR_RATIO}
    run.finish({**summary, "ema_decay": ema_decay, "snr_gamma": snr_gamma})
    return folder / "model"


def save_pipeline(
    path: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> Path:
    """An SD 2.x diffusers folder with the Turbo scheduler config (Euler, trailing timesteps)."""
    from diffusers import StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler.from_pretrained(turbo_config_dir("sd2"), subfolder="scheduler")
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pretrained(pipe, path)
    return path
