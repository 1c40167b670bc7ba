"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020), as StyleGAN-T uses.

Real and generated images get independent random translations and cutouts before the frozen feature
network, so the discriminator cannot tell them apart by memorised pixel positions or by patterns the
feature network happens to be blind or over-sensitive to; being differentiable, the generator's gradient
still reaches x̂ through them. No colour augmentation: the discriminator is conditioned on captions
that name colours. Random draws come from the step's generator, so a resumed run augments alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("translation", "cutout")


def parse_policy(policy: str) -> tuple[str, ...]:
    """The augmentations named by "none", "" or a comma-separated subset of POLICIES."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none")
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}: use none or some of {', '.join(POLICIES)}")
    return names


def translate(images: torch.Tensor, generator: torch.Generator, ratio: float = 1 / 8) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size in x and y, filling with zeros (mid-grey in [-1, 1])."""
    n, _, h, w = images.shape
    pad_y, pad_x = max(1, round(h * ratio)), max(1, round(w * ratio))
    dy = torch.randint(0, 2 * pad_y + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad_x + 1, (n,), generator=generator).tolist()
    padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y))
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def cutout(images: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of `ratio` of the image size at a random place in each image."""
    n, _, h, w = images.shape
    ch, cw = round(h * ratio), round(w * ratio)
    top = torch.randint(0, h - ch + 1, (n,), generator=generator)
    left = torch.randint(0, w - cw + 1, (n,), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = (rows >= top.view(n, 1, 1)) & (rows < (top + ch).view(n, 1, 1))
    inside = inside & (cols >= left.view(n, 1, 1)) & (cols < (left + cw).view(n, 1, 1))
    return images * (~inside).unsqueeze(1).to(images.device, images.dtype)


def augment(images: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    for name in policy:
        images = translate(images, generator) if name == "translation" else cutout(images, generator)
    return images
