"""Nearest ×2 upsampling followed by a 3×3 convolution, run as one stride-2 transposed convolution.

Every SD/SDXL VAE decoder and UNet upsamples this way (diffusers' `Upsample2D`): repeat each pixel 2×2, then
convolve at the new size. Each output pixel of a 3×3 kernel on a 2×2-repeated image sees only 2×2 distinct
input pixels, so the same result is a transposed convolution (stride 2, padding 1) whose 4×4 kernel sums
the taps that land on the same input pixel — 16 multiplies per output pixel and channel pair instead of 36,
and no 4×-sized upsampled tensor in memory. It is exact (a re-association of sums; float rounding aside).

Measured on SD's VAE decoder at 512² (bf16, 2 threads, random weights): its three upsampling convolutions
are about a quarter of the decoder's work; folded, they run ~2× faster in eager mode and through OpenVINO
(docs/performance.md). `fuse_upsamplers` changes only the modules' class: parameters, state dict keys and
saved files stay diffusers' own. Training (autograd on) and unusual upsamplers take diffusers' path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn


def _taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    # Along one axis, output phase 0 of a 3-tap kernel on a 2×-repeated signal weighs its input pixels
    # (i−1, i) by (w0, w1+w2), phase 1 weighs (i, i+1) by (w0+w1, w2); a stride-2 transposed
    # convolution reads these as kernel positions (3, 1) and (2, 0).
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack((w2, w1 + w2, w0 + w1, w0), dim)


def transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (C_in, C_out, 4, 4) kernel of `conv_transpose2d(x, ·, stride=2, padding=1)` that equals
    `conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)` for a (C_out, C_in, 3, 3) weight."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"expected a 3×3 kernel, got {tuple(weight.shape)}")
    return _taps(_taps(weight, 2), 3).transpose(0, 1)


def _foldable(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class FusedUpsample2D(Upsample2D):
    """diffusers' `Upsample2D` whose nearest-×2-then-3×3-conv runs as one transposed convolution at inference."""

    _kernel: tuple[tuple[object, ...], torch.Tensor] | None = None

    def _fast(self, hidden_states: torch.Tensor, output_size: object) -> bool:
        if torch.is_grad_enabled() or self.norm is not None or self.use_conv_transpose or not self.interpolate:
            return False
        if not self.use_conv or self.name != "conv" or not _foldable(self.conv):
            return False
        height, width = hidden_states.shape[-2:]
        return output_size is None or tuple(output_size) == (2 * height, 2 * width)

    def kernel(self) -> torch.Tensor:
        """The folded kernel, cached while the weight is unchanged (an in-place update bumps its version);
        built afresh under tracing and compilation, which fold it into a constant themselves."""
        weight = self.conv.weight
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return transposed_kernel(weight)
        # inference tensors keep no version counter (only code inside inference mode could change them in
        # place, and turbokit changes weights outside it)
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.dtype, weight.device, weight.shape)
        if self._kernel is None or self._kernel[0] != key:
            layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else None
            folded = transposed_kernel(weight.to(torch.promote_types(weight.dtype, torch.float32))).to(weight.dtype)
            self._kernel = (key, folded.contiguous(memory_format=layout or torch.contiguous_format))
        return self._kernel[1]

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self._fast(hidden_states, output_size):
            return super().forward(hidden_states, output_size, *args, **kwargs)
        return F.conv_transpose2d(hidden_states, self.kernel(), self.conv.bias, stride=2, padding=1)


def fuse_upsamplers(model: nn.Module) -> int:
    """Make every diffusers `Upsample2D` in `model` a `FusedUpsample2D` (same parameters); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Upsample2D:
            module.__class__ = FusedUpsample2D
            count += 1
    return count
