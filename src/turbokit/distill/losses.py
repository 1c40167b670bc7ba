"""The losses of Adversarial Diffusion Distillation (Sauer et al. 2023, arXiv 2311.17042), EDM style.

Each term of the paper is one small pure function with the paper's symbols; the trainer composes them:

    L_D = hinge_discriminator_loss(D(F(x0)), D(F(sg(x̂)))) + γ·r1_penalty(D(F(x0)), F(x0))
    L_G = generator_loss(hinge_generator_loss(D(F(x̂))), distillation_loss(x̂, x̂_ψ, c(t)), λ)

Logits come as one tensor per discriminator head k (any shape with the batch first, e.g. one
logit per token); within a head they are averaged, over heads they are summed (paper eq. 2, 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_DISTILL_LAMBDA = 2.5  # λ in the paper, "across all experiments" (Sec. 4)
DEFAULT_R1_GAMMA = 1e-5  # γ in the paper (Sec. 4)

DISTILL_WEIGHTINGS = ("exponential", "sds", "nfsd")

NFSD_GUIDANCE_SCALE = 7.5  # s in Katzir et al.: NFSD works at a nominal CFG scale
NFSD_SMALL_T = 200  # below this teacher timestep the unconditional ε̂ alone is δ_D
# p_neg of Katzir et al.: its condition direction is taken as ≈ −δ_D, so ε̂(p_neg) ≈ δ_N and ε̂(∅) − ε̂(p_neg) ≈ δ_D
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


def hinge_discriminator_loss(real_logits: list[Tensor], fake_logits: list[Tensor]) -> Tensor:
    """L_adv^D without R1 (ADD eq. 3): Σ_k mean(max(0, 1 − D_k(F_k(x0)))) + mean(max(0, 1 + D_k(F_k(x̂))))."""
    per_head = [
        torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
        for real, fake in zip(real_logits, fake_logits, strict=True)
    ]
    return torch.stack(per_head).sum()


def hinge_generator_loss(fake_logits: list[Tensor]) -> Tensor:
    """L_adv^G (ADD eq. 2): −Σ_k mean(D_k(F_k(x̂)))."""
    return -torch.stack([fake.mean() for fake in fake_logits]).sum()


def r1_penalty(real_logits: list[Tensor], head_inputs: list[Tensor]) -> Tensor:
    """R1 (Mescheder et al. 2018) on the input of each head, as ADD Sec. 3.2 does: Σ_k E_x0 ||∂(Σ D_k)/∂F_k||².

    `head_inputs[k]` is F_k(x0), detached from the frozen feature network and set `requires_grad_(True)`
    by the caller, and `real_logits[k] = D_k(head_inputs[k])`. The gradient is taken with respect to
    these features, not the pixels and not the head parameters, with `create_graph=True` so that the
    penalty backpropagates into the heads. Heads are independent, so one backward pass of Σ_k ΣD_k
    gives every ∂(ΣD_k)/∂F_k. A head whose logits ignore its input contributes 0. Multiply by γ
    (`DEFAULT_R1_GAMMA`) in the caller.
    """
    if len(real_logits) != len(head_inputs):
        raise ValueError(f"{len(real_logits)} heads of logits but {len(head_inputs)} head inputs")
    total = torch.stack([logits.sum() for logits in real_logits]).sum()
    grads = torch.autograd.grad(total, head_inputs, create_graph=True, allow_unused=True, materialize_grads=True)
    return torch.stack([g.square().flatten(1).sum(1).mean() for g in grads]).sum()


def distill_weighting(name: str, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """c(t) of the distillation loss (ADD eq. 4), from the teacher's (α_t, σ_t) at its timestep t.

    - `exponential`: c(t) = α_t, less weight at high noise; the ablation default (ADD Table 1d, "exp").
    - `sds`: c(t) = α_t/(2σ_t)·w(t) (ADD Appendix A), for which the gradient of c(t)·||x̂ − sg(x̂_ψ)||²
      is the SDS gradient w(t)(ε̂_ψ − ε')∂x̂/∂θ: with x̂_t = α_t x̂ + σ_t ε' and x̂_ψ = (x̂_t − σ_t ε̂_ψ)/α_t,
      x̂ − x̂_ψ = (σ_t/α_t)(ε̂_ψ − ε'), so the gradient is 2c(t)(σ_t/α_t)(ε̂_ψ − ε')∂x̂/∂θ. ADD does not
      name its w(t) beyond "the SDS weighting"; we take DreamFusion's w(t) = σ_t² (Poole et al. 2022,
      the paper ADD cites for SDS), so c(t) = α_t·σ_t/2.
    - `nfsd`: the same c(t) as `sds`; NFSD changes the target, not the weight (see `nfsd_target`).

    α_t must be > 0 for the x0 target to exist (not the terminal step of a zero-SNR schedule).
    """
    if name == "exponential":
        return alpha_t
    if name in ("sds", "nfsd"):
        return alpha_t * sigma_t / 2  # α_t/(2σ_t) · w(t) with w(t) = σ_t²
    raise ValueError(f"unknown distillation weighting {name!r}; choose one of: {', '.join(DISTILL_WEIGHTINGS)}")


def nfsd_target(
    student_x0: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    eps_neg: Tensor,
    t: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    guidance_scale: float = NFSD_GUIDANCE_SCALE,
) -> Tensor:
    """The x0 target whose distillation loss has the Noise-Free Score Distillation gradient (Katzir et al. 2023).

    NFSD replaces the SDS residual (ε̂_ψ^cfg − ε') by δ_D + s·δ_C, with the teacher's ε predictions at
    x̂_t for the prompt (`eps_cond`), the empty prompt (`eps_uncond`) and `NFSD_NEGATIVE_PROMPT` (`eps_neg`):
    δ_C = ε̂(y) − ε̂(∅); δ_D = ε̂(∅) for t < 200, else ε̂(∅) − ε̂(p_neg). The noise term δ_N − ε' drops out.
    Following ADD Appendix A in reverse, the target is sg(x̂) − (σ_t/α_t)(δ_D + s·δ_C): with
    c(t) = `distill_weighting("nfsd", ...)` the loss gradient is w(t)(δ_D + s·δ_C)∂x̂/∂θ. ADD names NFSD
    as its final models' choice but gives no formula; this is the NFSD paper's definition in ADD's loss.
    `t` holds integer teacher timesteps (0..999), one per sample.
    """
    delta_c = eps_cond - eps_uncond
    small_t = (t < NFSD_SMALL_T).view(-1, *([1] * (eps_uncond.dim() - 1)))
    delta_d = torch.where(small_t, eps_uncond, eps_uncond - eps_neg)
    return (student_x0 - sigma_t / alpha_t * (delta_d + guidance_scale * delta_c)).detach()


def distillation_loss(student_x0: Tensor, teacher_x0: Tensor, weight: Tensor) -> Tensor:
    """L_distill (ADD eq. 4): mean over the batch of c(t)·d(x̂, sg(x̂_ψ)), d the squared L2 distance.

    ADD writes d = ||x − y||²₂ without saying how it is normalised in practice; here it is averaged over
    elements, so λ does not depend on resolution (and the SDS identity of `distill_weighting` holds up to
    that constant 1/N). `weight` is c(t), one per sample, shaped (B,) or like (B, 1, 1, 1).
    Works in whatever space it is given: pixels as in the paper, or latents.
    """
    d = (student_x0 - teacher_x0.detach()).square().flatten(1).mean(1)
    return (weight.reshape(-1) * d).mean()


def generator_loss(adversarial: Tensor, distillation: Tensor, distill_lambda: float = DEFAULT_DISTILL_LAMBDA) -> Tensor:
    """L = L_adv^G + λ·L_distill (ADD eq. 1)."""
    return adversarial + distill_lambda * distillation


def discriminator_accuracy(real_logits: list[Tensor], fake_logits: list[Tensor]) -> tuple[float, float]:
    """For logging: the fraction of real logits > 0 and of fake logits < 0, over all heads and tokens."""
    real = torch.cat([logits.detach().flatten() for logits in real_logits])
    fake = torch.cat([logits.detach().flatten() for logits in fake_logits])
    return (real > 0).float().mean().item(), (fake < 0).float().mean().item()
