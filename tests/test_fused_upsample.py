import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.upsampling import Upsample2D

from turbokit.fused_upsample import FusedUpsample2D, fuse_upsamplers, transposed_kernel


def _nearest_then_conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 4, 4), (1, 6, 5, 7)])
def test_transposed_kernel_equals_nearest_upsample_then_conv(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 4, 3, padding=1)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = _nearest_then_conv(x, conv)
        got = F.conv_transpose2d(x, transposed_kernel(conv.weight), conv.bias, stride=2, padding=1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_transposed_kernel_rejects_other_kernel_sizes() -> None:
    with pytest.raises(ValueError, match="3×3"):
        transposed_kernel(torch.zeros(2, 2, 5, 5))


def _upsampler(channels: int = 6) -> tuple[Upsample2D, FusedUpsample2D]:
    torch.manual_seed(1)
    plain = Upsample2D(channels, use_conv=True).eval()
    fused = copy.deepcopy(plain)
    assert fuse_upsamplers(fused) == 1
    return plain, fused


def test_fused_upsampler_matches_diffusers_and_keeps_its_state_dict() -> None:
    plain, fused = _upsampler()
    assert isinstance(fused, FusedUpsample2D)
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 6, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-5)
        # an output size other than 2× takes diffusers' own path, and gives its result
        torch.testing.assert_close(fused(x, output_size=(11, 7)), plain(x, output_size=(11, 7)))


def test_fused_upsampler_runs_on_inference_tensors() -> None:
    plain, fused = _upsampler()
    with torch.inference_mode():
        x = torch.randn(1, 6, 4, 4)
        plain, fused = plain.to(torch.float64), fused.to(torch.float64)  # weights become inference tensors
        torch.testing.assert_close(fused(x.double()), plain(x.double()), rtol=0, atol=1e-9)


def test_fused_upsampler_follows_in_place_weight_updates() -> None:
    plain, fused = _upsampler()
    x = torch.randn(1, 6, 4, 4)
    with torch.no_grad():
        fused(x)  # caches the folded kernel
        for module in (plain, fused):
            module.conv.weight.mul_(-2.0).add_(0.5)
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-5)


def test_fused_upsampler_trains_through_diffusers_path() -> None:
    plain, fused = _upsampler()
    x = torch.randn(1, 6, 4, 4)
    plain(x).square().sum().backward()
    fused(x).square().sum().backward()
    assert fused._kernel is None  # autograd on: the folded kernel was never built
    torch.testing.assert_close(fused.conv.weight.grad, plain.conv.weight.grad)


def test_fused_upsampler_in_bf16_channels_last_stays_within_bf16_rounding() -> None:
    plain, fused = _upsampler(16)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        exact = plain(x)
        plain_bf16 = plain.to(torch.bfloat16, memory_format=torch.channels_last)
        fused_bf16 = fused.to(torch.bfloat16, memory_format=torch.channels_last)
        xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        error = (fused_bf16(xb).float() - exact).norm() / exact.norm()
        reference_error = (plain_bf16(xb).float() - exact).norm() / exact.norm()
    assert error < 2 * reference_error + 1e-3


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def test_fuse_upsamplers_leaves_vae_and_unet_outputs_and_files_unchanged(tmp_path) -> None:
    torch.manual_seed(2)
    vae = _tiny_vae()
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    z, latents, text = torch.randn(1, 4, 6, 5), torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        decoded, predicted = vae.decode(z).sample, unet(latents, 10, text).sample
        assert fuse_upsamplers(vae) == 1 and fuse_upsamplers(unet) == 1
        torch.testing.assert_close(vae.decode(z).sample, decoded, rtol=0, atol=1e-5)
        torch.testing.assert_close(unet(latents, 10, text).sample, predicted, rtol=0, atol=1e-5)
    vae.save_pretrained(tmp_path)
    reloaded = AutoencoderKL.from_pretrained(tmp_path)
    assert all(type(m) is not FusedUpsample2D for m in reloaded.modules())
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, vae.state_dict()[key], rtol=0, atol=0)
