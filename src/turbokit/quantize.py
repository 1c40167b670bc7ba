"""int8 UNet on the CPU, opt-in with `--quantize int8` (issue #6 §3), through torchao.

What becomes int8: every `nn.Linear` of the UNet's transformer blocks (attention q/k/v/out, the
feed-forward, and proj_in/proj_out where they are linear), weights *and* activations: weights
symmetric with one scale per output channel, quantized once at load; activations symmetric with one
scale per token, quantized on the fly at each call (dynamic), so there is no calibration step. The
products run as oneDNN's u8×s8→s32 GEMM (`torch._int_mm`), which uses the CPU's VNNI dot products.

What stays in the compute dtype (bf16 on CPUs that have it), and why:
- the convolutions (conv_in/conv_out and every ResNet and sampling conv): torchao's int8 tensor
  implements linear only;
- attention's QKᵀ, softmax and AV (SDPA): activation × activation products, not weights;
- the time-embedding linears (`time_embedding`, `time_emb_proj`, SDXL's `add_embedding`): one row per
  image, so nothing to speed up, and they condition every block, so their error would spread;
- norms and nonlinearities.

Nothing is cached on disk: quantizing the weights takes well under a second for the tiny models and is a
pass over the linear weights at full size, and a cached artefact would need pickle (torchao's tensors do
not go into safetensors) and could go stale against the weights it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from turbokit import metrics
from turbokit.errors import TurbokitError

if TYPE_CHECKING:
    from turbokit.pipeline import TurboPipeline

QUANTIZE_METHODS = ("int8",)
INSTALL_INT8 = "pip install 'turbokit[int8]'"  # = torchao
KEPT_LINEARS = ("time_embedding", "time_emb_proj", "add_embedding")  # see the module docstring


def check_quantize(method: str | None, device: torch.device, compile: str | None = None) -> None:
    """Fail early, before any model loads, when `method` cannot run on `device` or its library is missing.
    With `compile="openvino"` the int8 model comes from NNCF instead (`turbokit.openvino_backend`)."""
    if method is None:
        return
    if method not in QUANTIZE_METHODS:
        raise TurbokitError(f"unknown quantization {method!r}; use one of {', '.join(QUANTIZE_METHODS)}")
    if device.type != "cpu":
        raise TurbokitError(
            f"--quantize int8 runs on the CPU only, not {device.type}: add --device cpu or leave out --quantize"
        )
    if compile != "openvino":
        _check_torchao()


def _check_torchao() -> None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except ImportError as err:
        raise TurbokitError(f"--quantize int8 needs torchao >= 0.18 (missing or too old): {INSTALL_INT8}") from err


def _quantizable(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not any(part in name for part in KEPT_LINEARS)


def quantize_unet(unet: torch.nn.Module) -> list[str]:
    """Make the UNet's linear layers int8 in place (weights now, activations at each call); returns their names."""
    _check_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.utils import should_reduce_range

    config = Int8DynamicActivationInt8WeightConfig(
        # Without VNNI, oneDNN's u8×s8 path adds pairs of products in int16, which saturates at full range.
        reduce_range=should_reduce_range(torch.device("cpu")),
        set_inductor_config=False,  # eager kernels: leave torch.compile's global settings alone
    )
    quantize_(unet, config, filter_fn=_quantizable)
    return int8_linears(unet)


def int8_linears(module: torch.nn.Module) -> list[str]:
    """Names of the linear layers whose weights are stored as int8 (torchao keeps the values in `.qdata`)."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and getattr(m.weight, "qdata", torch.empty(0)).dtype == torch.int8
    ]


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """The worst per-image PSNR in dB of (N, 3, H, W) `images` against `reference`, both in [0, 1], compared
    as the 8-bit images a user gets (100 dB when identical)."""

    def to_8bit(x: torch.Tensor) -> torch.Tensor:
        return (x.detach().float().clamp(0, 1) * 255).round() / 255

    return metrics.psnr(to_8bit(images), to_8bit(reference)).min().item()


def quality_check(
    quantized: TurboPipeline, reference: TurboPipeline, prompts: Sequence[str], seed: int = 0, steps: int = 1
) -> float:
    """The worst PSNR (dB) over `prompts` of the quantized pipeline's images against the reference
    pipeline's (the same model unquantized, bf16 or fp32) for the same prompt and seed."""
    return min(
        psnr(quantized(prompt, seed=seed, steps=steps).pixels, reference(prompt, seed=seed, steps=steps).pixels)
        for prompt in prompts
    )
