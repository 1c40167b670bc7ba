"""Tiny SD 1.x / SD 2.x / SDXL models with random weights, built in code for tests and the demo.

They keep the real architectures' conventions that single-file loading relies on (64-channel
attention heads for SD 2.x and SDXL, 8 heads for SD 1.x, an 8× VAE, the real CLIP vocabulary)
while being small enough to run a step in milliseconds on a CPU. Their images are noise-like:
they test the machinery, never quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from diffusers.schedulers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from turbokit.compat import save_pretrained
from turbokit.configs import turbo_config_dir
from turbokit.tokenizer import PAD_OPENAI, PAD_OPENCLIP, clip_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
TINY_SIZE = 64  # native image size of the tiny models, pixels


def _text_config(hidden: int, act: str, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act=act,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def tiny_vae() -> AutoencoderKL:
    """An 8× AutoencoderKL (four levels, as in SD) with 32–64 channels."""
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_SIZE,
    )


def tiny_autoencoder_tiny() -> AutoencoderTiny:
    """A minimal AutoencoderTiny (TAESD layout, fewer channels) for the `--tiny-vae` path."""
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )


def tiny_components(family: str, seed: int = 0) -> dict[str, object]:
    """Random-weight components of a tiny model of `family` ("sd1", "sd2" or "sdxl")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    common = dict(sample_size=TINY_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32)
    if family == "sdxl":
        unet = UNet2DConditionModel(
            **common,
            block_out_channels=(64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(1, 2),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64 + 128,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=128 + 6 * 8,
        )
        return {
            "unet": unet,
            "vae": tiny_vae(),
            "text_encoder": CLIPTextModel(_text_config(64, "quick_gelu", 64)),
            "text_encoder_2": CLIPTextModelWithProjection(_text_config(128, "gelu", 128)),
            "tokenizer": clip_tokenizer(PAD_OPENAI),
            "tokenizer_2": clip_tokenizer(PAD_OPENCLIP),
            "scheduler": EulerAncestralDiscreteScheduler.from_pretrained(
                turbo_config_dir("sdxl"), subfolder="scheduler"
            ),
        }
    sd1 = family == "sd1"
    unet = UNet2DConditionModel(
        **common,
        block_out_channels=(32, 64) if sd1 else (64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8 if sd1 else (1, 2),
        cross_attention_dim=64,
        use_linear_projection=not sd1,
    )
    return {
        "unet": unet,
        "vae": tiny_vae(),
        "text_encoder": CLIPTextModel(_text_config(64, "quick_gelu" if sd1 else "gelu", 64)),
        "tokenizer": clip_tokenizer(PAD_OPENAI if sd1 else PAD_OPENCLIP),
        "scheduler": EulerDiscreteScheduler.from_pretrained(turbo_config_dir("sd2"), subfolder="scheduler"),
    }


def save_tiny_model(path: str | Path, family: str = "sd2", seed: int = 0) -> Path:
    """Write a tiny random model as a diffusers folder that both diffusers and turbokit load."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the pipelines' image-processor imports warn about torchvision
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = tiny_components(family, seed)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    path = Path(path)
    save_pretrained(pipe, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight model (for tests and the demo).")
    parser.add_argument("path")
    parser.add_argument("--family", choices=FAMILIES, default="sd2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = save_tiny_model(args.path, args.family, args.seed)
    print(f"wrote a tiny {args.family} model with RANDOM weights (not a trained model) to {path}")


if __name__ == "__main__":
    main()
