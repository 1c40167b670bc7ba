"""TurboPipeline behaviour a user notices: seeds, batches, sizes, caching, decoders, metadata."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from turbokit import TurboPipeline
from turbokit.errors import InvalidRequestError
from turbokit.tiny import tiny_autoencoder_tiny


@pytest.fixture(scope="module")
def sd(tiny_models):
    return TurboPipeline.from_pretrained(tiny_models["sd2"], device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    return TurboPipeline.from_pretrained(tiny_models["sdxl"], device="cpu", dtype="fp32")


def test_same_seed_same_image_whatever_batch_position_or_history(sdxl):
    alone = sdxl("a red circle", seed=7, steps=2).pixels
    sdxl("something else entirely", seed=123, steps=3)  # state left behind must not matter
    batch = sdxl("a red circle", seed=[1, 7, 9], num_images=3, steps=2).pixels
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 0.01  # other seeds do give other images


def test_base_seed_numbers_images_consecutively(sd):
    result = sd("a cat", seed=40, num_images=3)
    assert result.seeds == [40, 41, 42]
    assert [p.seed for p in result.parameters] == [40, 41, 42]


def test_random_seed_is_recorded_and_reproduces_the_image(sd):
    first = sd("a cat")
    again = sd("a cat", seed=first.seeds[0])
    torch.testing.assert_close(first.pixels, again.pixels)


def test_prompt_cache_skips_the_text_encoder_for_repeated_prompts(sd):
    calls = []
    handle = sd.text_encoders[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        sd("a prompt for the cache test", seed=0)
        sd("a prompt for the cache test", seed=1)
        sd(["a prompt for the cache test", "a second cached prompt"], seed=[2, 3])
    finally:
        handle.remove()
    assert len(calls) == 2  # the first prompt once, the new one once


def test_native_size_and_other_sizes(sd):
    assert sd.native_size == 64
    assert sd("x", seed=0).images[0].size == (64, 64)
    assert sd("x", seed=0, width=96, height=64).images[0].size == (96, 64)
    assert sd("x", seed=0, width=72, height=16).images[0].size == (72, 16)  # latent 9×2: odd sizes work


@pytest.mark.parametrize(("width", "height"), [(65, 64), (64, 60), (0, 64), (8, 64), (8192, 64)])
def test_bad_sizes_are_user_errors(sd, width, height):
    with pytest.raises(InvalidRequestError, match="multiple of 8"):
        sd("x", width=width, height=height)


def test_size_far_from_native_warns(sd, caplog):
    with caplog.at_level(logging.WARNING, logger="turbokit"):
        sd("x", seed=0, width=256, height=64)
    assert "far from this model's native 64x64" in caplog.text


def test_negative_prompt_without_guidance_warns_that_it_is_ignored(sd, caplog):
    with caplog.at_level(logging.WARNING, logger="turbokit"):
        plain = sd("x", seed=0).pixels
        ignored = sd("x", seed=0, negative_prompt="blurry").pixels
    assert "negative prompt is ignored" in caplog.text
    torch.testing.assert_close(plain, ignored)


def test_prompts_over_77_tokens_warn_what_is_ignored(sd, caplog):
    with caplog.at_level(logging.WARNING, logger="turbokit"):
        sd(" ".join(["cat"] * 80) + " zebra", seed=0)
    assert "over CLIP's 77 tokens" in caplog.text and "zebra" in caplog.text


def test_guidance_changes_the_image(sd):
    plain = sd("x", seed=0).pixels
    guided = sd("x", seed=0, guidance_scale=5.0, negative_prompt="blurry").pixels
    assert (plain - guided).abs().max() > 1e-3


def test_img2img_keeps_the_input_at_low_strength(sd):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = sd("x", image=source, strength=0.25, steps=4, seed=0)
    assert out.parameters[0].strength == 0.25
    assert out.images[0].size == (64, 64)
    with pytest.raises(InvalidRequestError, match="int"):
        sd("x", image=source, strength=0.2, steps=2)


def test_img2img_default_size_follows_the_input_aspect(sd):
    source = Image.new("RGB", (200, 100), "red")
    out = sd("x", image=source, seed=0, steps=2, strength=0.5)
    width, height = out.images[0].size
    assert width % 8 == 0 and height % 8 == 0
    assert abs(width / height - 2) < 0.2


def test_parameters_describe_the_generation(sdxl):
    params = sdxl("a blue star", seed=5, steps=4).parameters[0]
    assert (params.prompt, params.steps, params.seed, params.width, params.height) == ("a blue star", 4, 5, 64, 64)
    assert params.sampler == "Euler a" and params.strength is None and params.guidance_scale == 0


def test_sampler_follows_the_scheduler_config(sd, sdxl):
    assert sd.default_sampler == "euler" and sdxl.default_sampler == "euler_a"
    with pytest.raises(InvalidRequestError, match="unknown sampler"):
        sd("x", sampler="dpm++")


def test_seed_count_and_range_are_checked(sd):
    with pytest.raises(InvalidRequestError, match="2 seeds given for 3 images"):
        sd("x", seed=[1, 2], num_images=3)
    with pytest.raises(InvalidRequestError, match="seeds must be between"):
        sd("x", seed=-1)


def test_tiny_vae_decodes(tiny_models, tmp_path):
    tiny_autoencoder_tiny().save_pretrained(tmp_path / "taesd")
    pipe = TurboPipeline.from_pretrained(tiny_models["sd2"], device="cpu", dtype="fp32", tiny_vae=tmp_path / "taesd")
    full = TurboPipeline.from_pretrained(tiny_models["sd2"], device="cpu", dtype="fp32")
    out = pipe("x", seed=0).pixels
    assert out.shape == (1, 3, 64, 64)
    assert (out - full("x", seed=0).pixels).abs().max() > 1e-3  # really another decoder


def test_bf16_runs_and_stays_close_to_fp32(tiny_models, sd):
    bf16 = TurboPipeline.from_pretrained(tiny_models["sd2"], device="cpu", dtype="bf16")
    assert bf16.unet.dtype == torch.bfloat16
    diff = (bf16("x", seed=0).pixels - sd("x", seed=0).pixels).abs().mean()
    assert diff < 0.05


def test_no_model_given_means_the_default_model(tiny_models, monkeypatch):
    monkeypatch.setenv("TURBOKIT_MODEL", str(tiny_models["sd2"]))  # as the CLI's default does
    default = TurboPipeline.from_pretrained(dtype="fp32")("a red circle", seed=3).pixels
    named = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="fp32")("a red circle", seed=3).pixels
    assert torch.equal(default, named)


def test_unet_and_vae_upsamplers_run_fused(sd):
    """The pipeline's UNet and VAE upsample with one transposed convolution (`turbokit.fused_upsample`);
    test_parity checks the images against diffusers' own pipelines, which do not."""
    from turbokit.fused_upsample import FusedUpsample2D

    for model in (sd.unet, sd.vae):
        assert any(isinstance(m, FusedUpsample2D) for m in model.modules())
