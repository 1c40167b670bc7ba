"""PSNR and SSIM."""

from __future__ import annotations

import torch

from turbokit import metrics


def test_ssim_is_one_for_identical_images_and_matches_the_formula():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(2))
    assert metrics.psnr(x, x).min() >= 99
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (metrics.ssim(x, noisy) < 1).all()
    assert (metrics.ssim(x, x.flip(0)) < metrics.ssim(x, noisy)).all()
    # flat images a and b: no variance, so SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.3, 0.6, 0.01**2
    flat = metrics.ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    torch.testing.assert_close(flat, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)]))
