"""`turbokit info`: what a model is — family, native size, sampler, precision, parameter counts."""

from __future__ import annotations

import torch

from turbokit.pipeline import SAMPLERS, TurboPipeline

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def parameter_counts(pipe: TurboPipeline) -> dict[str, int]:
    """Parameters per component, in the order a reader expects (unet, vae, text encoders, tiny decoder)."""
    parts = {"unet": pipe.unet, "vae": pipe.vae}
    parts.update({f"text_encoder{'_2' if i else ''}": enc for i, enc in enumerate(pipe.text_encoders)})
    if pipe.tiny_vae is not None:
        parts["tiny_vae"] = pipe.tiny_vae
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def describe(pipe: TurboPipeline) -> dict[str, str]:
    """A model's facts as label → text, ready to print."""
    config = pipe.scheduler.config
    counts = parameter_counts(pipe)
    return {
        "model": pipe.model_name,
        "family": f"{pipe.family_name} ({FAMILY_NAMES[pipe.family_name]})",
        "native size": f"{pipe.native_size}x{pipe.native_size}",
        "scheduler": (
            f"{type(pipe.scheduler).__name__} ({config.get('timestep_spacing')} spacing in its config; turbokit "
            f"samples trailing timesteps), {pipe.prediction_type} prediction, "
            f"{config.get('beta_schedule')} betas {config.get('beta_start')}→{config.get('beta_end')}"
        ),
        "sampler": SAMPLERS[pipe.default_sampler],
        "dtype": f"{DTYPE_NAMES[pipe.precision.compute]} (VAE {DTYPE_NAMES[pipe.precision.vae]}) on {pipe.device}",
        "parameters": ", ".join(f"{name} {n / 1e6:.1f} M" for name, n in counts.items())
        + f"; total {sum(counts.values()) / 1e6:.1f} M",
    }
