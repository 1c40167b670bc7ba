"""turbokit's own sampling loop against diffusers' pipelines on the same weights (issue 2, §3).

Same weights, seeds and settings must give the same pixels to 1e-3 (max abs, [0, 1], fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
from PIL import Image

from turbokit import TurboPipeline

TOL = 1e-3
SEEDS = [11, 22]


def _max_diff(ours, expected: np.ndarray) -> float:
    return float(np.abs(ours.pixels.permute(0, 2, 3, 1).numpy() - expected).max())


def _turbo(path):
    return TurboPipeline.from_pretrained(path, device="cpu", dtype="fp32")


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def pair(request, tiny_models):
    path = tiny_models[request.param]
    return _turbo(path), path


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_text_to_image_matches_diffusers(pair, steps):
    ours, path = pair
    theirs = AutoPipelineForText2Image.from_pretrained(path)
    prompt = "a red circle on a blue background"
    expected = theirs(
        [prompt] * 2, num_inference_steps=steps, guidance_scale=0.0, generator=_generators(), output_type="np"
    ).images
    got = ours(prompt, steps=steps, num_images=2, seed=SEEDS)
    assert _max_diff(got, expected) < TOL


@pytest.mark.parametrize("steps, strength", [(2, 0.5), (4, 0.75), (1, 1.0)])
def test_image_to_image_matches_diffusers(pair, steps, strength):
    ours, path = pair
    theirs = AutoPipelineForImage2Image.from_pretrained(path)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    prompt = "a blue star"
    expected = theirs(
        [prompt] * 2,
        image=source,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=_generators(),
        output_type="np",
    ).images
    got = ours(prompt, image=source, strength=strength, steps=steps, num_images=2, seed=SEEDS)
    assert _max_diff(got, expected) < TOL


@pytest.mark.parametrize("negative_prompt", ["blurry", None])  # None: SDXL's zeroed negative conditioning
def test_guidance_with_negative_prompt_matches_diffusers(pair, negative_prompt):
    ours, path = pair
    theirs = AutoPipelineForText2Image.from_pretrained(path)
    kwargs = dict(guidance_scale=3.0, negative_prompt=negative_prompt)
    expected = theirs(
        "a cat", num_images_per_prompt=2, num_inference_steps=2, generator=_generators(), output_type="np", **kwargs
    ).images
    got = ours("a cat", steps=2, num_images=2, seed=SEEDS, **kwargs)
    assert _max_diff(got, expected) < TOL
