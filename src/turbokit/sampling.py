"""The sampling maths of Turbo models: one module of small functions, k-diffusion style.

Everything works in the σ-parametrisation of Karras et al. (2022): x_σ = x₀ + σ·ε with
σ_t = √((1 − ᾱ_t)/ᾱ_t). The pipeline, the trainer and the tests all call these functions, so the
numbers are defined once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from turbokit.errors import InvalidRequestError

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
"""`denoised = denoise(x, i)`: the model's x₀ estimate for `x` at schedule position `i`."""


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Evenly spaced timesteps that end at the last one (Lin et al. 2023, "trailing"): 1 → [999];
    4 → [999, 749, 499, 249]. Turbo models were distilled on exactly these."""
    if steps < 1 or steps > num_train_timesteps:
        raise InvalidRequestError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps / steps
    return torch.arange(num_train_timesteps, 0, -ratio, dtype=torch.float64).round()[:steps].float() - 1


def sigmas_at(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ at (possibly fractional) timesteps, linearly interpolated, with the final σ = 0 appended."""
    all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).double().sqrt()
    grid = torch.arange(len(all_sigmas), dtype=torch.float64)
    t = timesteps.double()
    lo = t.floor().long().clamp(0, len(all_sigmas) - 1)
    hi = (lo + 1).clamp(max=len(all_sigmas) - 1)
    w = t - grid[lo]
    sigmas = all_sigmas[lo] * (1 - w) + all_sigmas[hi] * w
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def img2img_steps(steps: int, strength: float) -> int:
    """Steps actually run for image-to-image: int(steps × strength), the convention of diffusers and A1111.

    The last `int(steps × strength)` timesteps of the `steps`-step schedule are run; the rule is
    enforced here so that a pair that would run nothing is an error rather than a silent no-op."""
    if not 0 < strength <= 1:
        raise InvalidRequestError(f"strength must be in (0, 1], got {strength}")
    run = int(steps * strength)
    if run < 1:
        if strength * 1000 < 1:
            raise InvalidRequestError(
                f"strength {strength:g} is too small: image-to-image runs int(steps × strength) steps, "
                "and no step count up to 1000 runs one"
            )
        min_steps = math.ceil(1 / strength)
        while int((min_steps - 1) * strength) >= 1:  # 1/strength may round up past the bound
            min_steps -= 1
        raise InvalidRequestError(
            f"image-to-image runs int(steps × strength) steps, which must be at least 1, but "
            f"int({steps} × {strength:g}) = 0; use steps {min_steps} (or more) with strength {strength:g}, "
            f"or strength {min(1.0, 1 / steps):.3g}{' (or more)' if steps > 1 else ''} with steps {steps}"
        )
    return run


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The UNet's input c_in·x = x/√(σ²+1): the noisy latent at unit variance (EDM's c_in)."""
    return x / (sigma**2 + 1) ** 0.5


def to_denoised(x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x₀ from the UNet's output: ε-prediction x − σ·ε; v-prediction (SD 2.x 768-v) c_skip·x + c_out·v."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_down, σ_up) of an ancestral step σ → σ_next: go deterministically to σ_down, then add
    fresh noise of scale σ_up so that the marginal is at σ_next (k-diffusion's get_ancestral_step)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dσ = (x − x₀)/σ (Karras et al. 2022, Alg. 1)."""
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def noise(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise, row i drawn from generators[i] only: an image depends on its own seed,
    not on its position in the batch or on what ran before. Drawn on the generators' device and then moved,
    as diffusers' `randn_tensor` draws with a list of generators (tested equal): the same seed gives the same
    image in both, on any device. Not diffusers' function itself: importing it imports all of diffusers."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Euler sampling over `sigmas` (last σ = 0). With `generators`, Euler-ancestral: each step
    re-injects noise drawn from the per-image generators (SDXL-Turbo's sampler)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, i).float()
        x = x.float()
        if generators is None:
            x = euler_step(x, denoised, sigma, sigma_next)
        else:
            sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
            x = euler_step(x, denoised, sigma, sigma_down)
            x = x + noise(x.shape, generators, x.device, x.dtype) * sigma_up
        if callback is not None:
            callback(i)
    return x


# ---------------------------------------------------------------- training-time (variance-preserving) form


def vp_coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) at integer timesteps `t`, shaped (B, 1, 1, 1) to broadcast over images."""
    abar = alphas_cumprod.to(t.device)[t.long()].float().view(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def add_noise_vp(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = α_t·x₀ + σ_t·ε (ADD eq. for x_s and for re-noising x̂)."""
    return alpha * x0 + sigma * eps


def x0_from_output_vp(
    x_t: torch.Tensor, model_output: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x̂₀ from a UNet output in the VP form: ε-prediction (x_t − σ·ε̂)/α; v-prediction α·x_t − σ·v̂."""
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")
