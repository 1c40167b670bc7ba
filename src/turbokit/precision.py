"""Which device and dtypes to run on: fast by default, never at the cost of NaN or black images."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from turbokit.errors import TurbokitError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """The dtype of the UNet and text encoders (`compute`) and the one the VAE runs in (`vae`)."""

    compute: torch.dtype
    vae: torch.dtype


def default_device() -> torch.device:
    """CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(name: str | None) -> torch.device:
    """A device from a user string ("cpu", "cuda", "cuda:1", "mps"); None picks the best available."""
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TurbokitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TurbokitError("device cuda was requested but no CUDA GPU is available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TurbokitError("device mps was requested but MPS is not available; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True where bf16 matrix multiplies run in hardware (x86 AVX512-BF16 or AMX, Arm BF16);
    elsewhere bf16 is emulated and slower than fp32."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    try:
        with open("/proc/cpuinfo") as f:
            return " bf16" in f.read()
    except OSError:  # macOS on Apple silicon: bf16 arrives with M2; without a probe, fp32 is the safe choice
        return False


def choose_precision(device: torch.device, requested: str | None = None, vae_force_upcast: bool = True) -> Precision:
    """The default precision for `device`, or the `requested` one ("fp32", "fp16", "bf16").

    fp16 VAEs of SD/SDXL overflow (NaN → black images; `force_upcast` in their config), so in
    fp16 the VAE runs in bf16 where the hardware has it and fp32 otherwise."""
    if requested is not None and requested != "auto":
        if requested not in DTYPES:
            raise TurbokitError(f"unknown dtype {requested!r}; use one of {', '.join(DTYPES)} or auto")
        compute = DTYPES[requested]
    elif device.type == "cuda" or device.type == "mps":
        compute = torch.float16
    else:
        compute = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    vae = compute
    if compute == torch.float16 and vae_force_upcast:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        vae = torch.bfloat16 if cuda_bf16 else torch.float32
    return Precision(compute=compute, vae=vae)


def training_mixed_precision(device: torch.device) -> str:
    """accelerate's `mixed_precision` for training on `device`: "bf16" where the hardware runs it (CUDA with
    bf16, a CPU with native bf16), else "no". Emulated bf16 is no saving: on a 2-core AVX2 CPU one step of the
    shapes recipe's distillation took 77 s in bf16 against 5.6 s in fp32 (docs/results.md, sixth session)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"
