"""Tiny inputs shared by the trainer tests: a random DINOv2 folder and a captioned image folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]


@pytest.fixture(scope="session")
def dino(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56
    )
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (64, 64), colour).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {colour} square")
    return root


@pytest.fixture
def add_options(tiny_models, dino, images, tmp_path) -> dict:
    """`DistillConfig` keywords for a one-step `--method add` run on the tiny models, quiet."""
    return dict(
        teacher=str(tiny_models["sd2"]),
        data=str(images),
        output_dir=str(tmp_path / "run"),
        dino_model=str(dino),
        train_batch_size=2,
        max_train_steps=1,
        report_to="none",
        progress=False,
    )
