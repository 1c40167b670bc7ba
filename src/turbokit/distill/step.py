"""One ADD / LADD training step: student forward → discriminator update → generator update.

Read top to bottom next to ADD §2 (docs: shared add-method.md): the student denoises a noised real
latent; the discriminator learns real from fake (hinge + R1 on its heads' inputs); the student
learns to fool it while matching the frozen teacher's x̂₀ of its re-noised output (λ·L_distill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from turbokit import sampling
from turbokit.distill import losses
from turbokit.distill.augment import augment
from turbokit.distill.config import DistillConfig
from turbokit.families import Conditioning


@dataclass
class StepModels:
    """What a step touches. `student` may be wrapped by accelerate (DDP, FSDP, DeepSpeed); the
    discriminator never is: its small heads are synchronised by the trainer's `d_update`."""

    student: nn.Module
    teacher: nn.Module
    vae: nn.Module
    disc: nn.Module
    alphas_cumprod: Tensor
    prediction_type: str  # the teacher's
    scaling_factor: float
    student_prediction_type: str


@dataclass
class StepBatch:
    """A batch ready for the step: latents x₀, real pixels (add only), text conditioning and UNet extras."""

    x0: Tensor
    pixels: Tensor | None
    cond: Conditioning
    uncond: Conditioning
    unet_kwargs: dict
    uncond_unet_kwargs: dict
    negative: Conditioning | None = None  # NFSD's negative prompt (only for --distill_weighting nfsd)
    negative_unet_kwargs: dict | None = None


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Heads take no gradient during the generator update: it is not theirs, and it would leak into
    their accumulated gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def x0_prediction(
    unet: nn.Module,
    x_t: Tensor,
    t: Tensor,
    cond: Conditioning,
    kwargs: dict,
    m: StepModels,
    prediction_type: str | None = None,
) -> Tensor:
    """x̂₀ of a UNet at timesteps t, from its output in `prediction_type` (default: the teacher's)."""
    alpha, sigma = sampling.vp_coefficients(m.alphas_cumprod, t)
    out = unet(x_t.to(cond.embeds.dtype), t, encoder_hidden_states=cond.embeds, return_dict=False, **kwargs)[0]
    return sampling.x0_from_output_vp(x_t, out.float(), alpha, sigma, prediction_type or m.prediction_type)


def guided_x0(x_t: Tensor, t: Tensor, b: StepBatch, m: StepModels, guidance: Tensor) -> Tensor:
    """The frozen teacher's x̂₀ at t, with per-sample classifier-free guidance (1 = none)."""
    cond_x0 = x0_prediction(m.teacher, x_t, t, b.cond, b.unet_kwargs, m)
    if bool((guidance <= 1).all()):
        return cond_x0
    uncond_x0 = x0_prediction(m.teacher, x_t, t, b.uncond, b.uncond_unet_kwargs, m)
    w = guidance.view(-1, 1, 1, 1)
    return uncond_x0 + w * (cond_x0 - uncond_x0)  # guidance on x̂₀ equals guidance on ε at fixed x_t


def teacher_x0(x_t: Tensor, t: Tensor, b: StepBatch, m: StepModels, guidance: Tensor, steps: int = 1) -> Tensor:
    """The distillation target: the frozen teacher's x̂₀ of x_t — in one step as the paper does, or after
    `steps` deterministic DDIM steps from each sample's t down to 0 (t·(steps−k)/steps, k = 0..steps−1).
    A small teacher's one-step x̂₀ from high t carries its ε errors amplified by σ/α (speckles); a few of
    its own steps give the clean image it would sample from there."""
    with torch.no_grad():
        x = x_t
        for k in range(steps - 1):
            t_k, t_next = t * (steps - k) // steps, t * (steps - k - 1) // steps
            x0 = guided_x0(x, t_k, b, m, guidance)
            alpha, sigma = sampling.vp_coefficients(m.alphas_cumprod, t_k)
            alpha_next, sigma_next = sampling.vp_coefficients(m.alphas_cumprod, t_next)
            x = alpha_next * x0 + sigma_next * (x - alpha * x0) / sigma
        return guided_x0(x, t // steps, b, m, guidance)


def nfsd_target_x0(
    x_hat: Tensor, x_hat_t: Tensor, t: Tensor, b: StepBatch, m: StepModels, guidance_scale: float
) -> Tensor:
    """The Noise-Free Score Distillation target (Katzir et al. 2023) from the teacher's ε̂ with the prompt,
    the empty prompt and NFSD's negative prompt, `guidance_scale` on the condition term (see
    `losses.nfsd_target`)."""
    alpha, sigma = sampling.vp_coefficients(m.alphas_cumprod, t)
    with torch.no_grad():
        eps = [
            (x_hat_t - alpha * x0_prediction(m.teacher, x_hat_t, t, cond, kwargs, m)) / sigma
            for cond, kwargs in (
                (b.cond, b.unet_kwargs),
                (b.uncond, b.uncond_unet_kwargs),
                (b.negative, b.negative_unet_kwargs),
            )
        ]
    return losses.nfsd_target(x_hat.detach(), *eps, t, alpha, sigma, guidance_scale)


def blind_image_condition(cond: dict, blind: Tensor) -> dict:
    """`cond` with the image embedding zeroed where `blind`: there the discriminator judges the sample on its
    caption alone. A student whose input is pure noise cannot know which real image the embedding names; kept,
    the condition lets the heads tell its samples from real ones by that mismatch, and rewards every sample
    for sitting near the caption's average image (a pull towards less variety)."""
    image = cond["heads"]["image_embeds"]
    heads = {**cond["heads"], "image_embeds": torch.where(blind.view(-1, 1), torch.zeros_like(image), image)}
    return {**cond, "heads": heads}


def decode(vae: nn.Module, latents: Tensor, scaling_factor: float) -> Tensor:
    """Latents → pixels in [-1, 1] through the frozen VAE (differentiable w.r.t. the latents)."""
    return vae.decode((latents / scaling_factor).to(vae.dtype)).sample.float()


def distill_step(
    b: StepBatch,
    m: StepModels,
    cfg: DistillConfig,
    gen: torch.Generator,
    disc_inputs: Callable[[Tensor, Tensor | None, StepBatch], tuple[Tensor, dict]],
    d_update: Callable[[Tensor], None],
    g_update: Callable[[Tensor], None],
) -> dict[str, float]:
    """One optimisation step; returns the logged scalars.

    `disc_inputs(latents, pixels, batch)` gives what the discriminator sees and its condition
    kwargs (add: pixels + text/image embeddings; ladd: re-noised latents + noise level + text);
    `d_update` / `g_update` backpropagate a loss and step the matching optimizer."""
    device, n = b.x0.device, b.x0.shape[0]
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731

    # Student: x_s = α_s·x₀ + σ_s·ε at s ∈ {τ_1..τ_N}, then x̂ = student's x̂₀.
    taus = torch.tensor(cfg.student_timestep_list)
    s = taus[torch.randint(len(taus), (n,), generator=gen)].to(device)
    alpha_s, sigma_s = sampling.vp_coefficients(m.alphas_cumprod, s)
    if cfg.zero_terminal_snr:  # at the terminal step the input is pure noise, exactly as at inference
        alpha_s = torch.where(s.view(-1, 1, 1, 1) == 999, torch.zeros_like(alpha_s), alpha_s)
    x_s = sampling.add_noise_vp(b.x0, rand(*b.x0.shape), alpha_s, sigma_s)
    x_hat = x0_prediction(m.student, x_s, s, b.cond, b.unet_kwargs, m, m.student_prediction_type)
    # x̂'s pixels (graph kept) for whoever reads them: ADD's discriminator and pixel-space distillation.
    needs_pixels = cfg.method == "add" or cfg.distill_in_pixels
    fake_pixels = decode(m.vae, x_hat, m.scaling_factor) if needs_pixels else None

    # The frozen feature network sees x̂ once, with the graph kept: the discriminator update reads the
    # features detached, the generator update backpropagates through them (heads change, features don't).
    real_in, real_cond = disc_inputs(b.x0, b.pixels, b)
    fake_in, fake_cond = disc_inputs(x_hat, fake_pixels, b)
    if cfg.disc_image_condition == "seen":  # pair i keeps its image condition only if student input i held x₀
        blind = alpha_s.flatten() == 0
        real_cond, fake_cond = blind_image_condition(real_cond, blind), blind_image_condition(fake_cond, blind)
    if policy := cfg.disc_augment_policy:  # independent draws for real and fake; conditions stay un-augmented
        real_in, fake_in = augment(real_in, policy, gen), augment(fake_in, policy, gen)
    fake_features = m.disc.features(fake_in, **fake_cond["features"])

    # Discriminator: hinge on real vs sg(fake), plus γ·R1 on the real features each head receives.
    real_features = [f.detach().requires_grad_(True) for f in m.disc.features(real_in, **real_cond["features"])]
    real_logits = m.disc.head_logits(real_features, **real_cond["heads"])
    fake_logits = m.disc.head_logits([f.detach() for f in fake_features], **fake_cond["heads"])
    loss_d = losses.hinge_discriminator_loss(real_logits, fake_logits)
    r1 = losses.r1_penalty(real_logits, real_features) if cfg.r1_gamma > 0 else torch.zeros((), device=device)
    d_update(loss_d + cfg.r1_gamma * r1)
    acc_real, acc_fake = losses.discriminator_accuracy(real_logits, fake_logits)

    # Generator: fool the (now updated) discriminator, and match the teacher's x̂₀ of the re-noised x̂.
    with frozen(m.disc):
        loss_adv = losses.hinge_generator_loss(m.disc.head_logits(fake_features, **fake_cond["heads"]))
    loss_distill = torch.zeros((), device=device)
    if cfg.distill_lambda_value > 0:  # LADD on synthetic data trains without the teacher's target
        t_lo, t_hi = cfg.teacher_t_range
        t = torch.randint(t_lo, t_hi, (n,), generator=gen).to(device)
        alpha_t, sigma_t = sampling.vp_coefficients(m.alphas_cumprod, t)
        x_hat_t = sampling.add_noise_vp(x_hat.detach(), rand(*b.x0.shape), alpha_t, sigma_t)
        g_lo, g_hi = cfg.guidance_range
        guidance = (g_lo + (g_hi - g_lo) * torch.rand(n, generator=gen)).to(device)
        if cfg.distill_weighting == "nfsd":
            target = nfsd_target_x0(x_hat, x_hat_t, t, b, m, cfg.nfsd_guidance_scale)
        else:
            target = teacher_x0(x_hat_t, t, b, m, guidance, cfg.teacher_steps)
        weight = losses.distill_weighting(cfg.distill_weighting, alpha_t.flatten(), sigma_t.flatten())
        if cfg.distill_in_pixels:
            with torch.no_grad():
                target = decode(m.vae, target, m.scaling_factor)
            loss_distill = losses.distillation_loss(fake_pixels, target, weight)
        else:
            loss_distill = losses.distillation_loss(x_hat, target, weight)
    loss_g = losses.generator_loss(cfg.adversarial_weight * loss_adv, loss_distill, cfg.distill_lambda_value)
    g_update(loss_g)

    return {
        "loss/discriminator": loss_d.item(),
        "loss/r1": r1.item(),
        "loss/adversarial": loss_adv.item(),
        "loss/distillation": loss_distill.item(),
        "loss/generator": loss_g.item(),
        "disc/accuracy_real": acc_real,
        "disc/accuracy_fake": acc_fake,
    }
