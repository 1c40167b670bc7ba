"""DiffAugment for the ADD discriminator: shapes kept, differentiable, reproducible from the generator."""

from __future__ import annotations

import pytest
import torch

from turbokit.distill.augment import augment, cutout, parse_policy, translate


def test_translation_shifts_content_and_keeps_the_gradient():
    images = torch.zeros(4, 3, 16, 16)
    images[:, :, 6:10, 6:10] = 1.0
    images.requires_grad_(True)
    moved = translate(images, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    assert not torch.equal(moved.detach(), images.detach())  # at least one image moved ...
    assert torch.allclose(moved.detach().sum((1, 2, 3)), images.detach().sum((1, 2, 3)))  # ... within the pad
    moved.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_cutout_zeroes_a_quarter_of_each_image():
    out = cutout(torch.ones(3, 3, 16, 16), torch.Generator().manual_seed(1))
    assert [(o == 0).float().mean().item() for o in out] == [0.25] * 3


def test_same_generator_state_same_augmentation():
    images = torch.randn(2, 3, 32, 32)
    policy = parse_policy("translation,cutout")
    a = augment(images, policy, torch.Generator().manual_seed(5))
    b = augment(images, policy, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_policy_parsing():
    assert parse_policy("none") == () and parse_policy("") == ()
    assert parse_policy("cutout, translation") == ("cutout", "translation")
    with pytest.raises(ValueError, match="unknown augmentation colour"):
        parse_policy("colour")


def test_the_trainer_augments_and_refuses_bad_settings(add_options):
    from turbokit.distill.config import DistillConfig
    from turbokit.distill.trainer import train
    from turbokit.errors import TurbokitError

    student = train(DistillConfig(**add_options, disc_augment="translation,cutout"))
    assert (student / "model_index.json").is_file()
    with pytest.raises(TurbokitError, match="--disc_augment: unknown augmentation colour"):
        DistillConfig(**add_options, disc_augment="colour").validate()
    with pytest.raises(TurbokitError, match="--method add's pixel discriminator only"):
        DistillConfig(**{**add_options, "method": "ladd"}, disc_augment="cutout").validate()
