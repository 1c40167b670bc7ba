"""Upsamplers fused into transposed convolutions (`turbokit.fused_upsample`) against diffusers' own, A/B.

SD-Turbo's VAE decoder (and with --unet its UNet) with random weights from the shipped configs, each in two
copies with the same weights — diffusers' `Upsample2D` (nearest ×2, then a 3×3 convolution) and turbokit's
fused one — timed interleaved at turbokit's default precision: eager (channels-last, as the pipeline places
them) and through `--compile openvino`'s backend. Also the error of each against the fp32 eager reference,
so that the fused path is seen to stay within the precision's own rounding.

    .venv/bin/python benchmarks/bench_upsample.py [--unet] [--no-openvino] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from turbokit.configs import turbo_config_dir
from turbokit.fused_upsample import fuse_upsamplers
from turbokit.info import DTYPE_NAMES
from turbokit.precision import choose_precision
from turbokit.tiny import TINY_SIZE, tiny_components


def models(tiny: bool, unet: bool) -> dict[str, tuple[torch.nn.Module, Callable[[int], tuple]]]:
    """name → (module, inputs for a size in pixels): the VAE's decoder and optionally the UNet."""
    if tiny:
        parts = tiny_components("sd2")
        vae, net = parts["vae"], parts["unet"] if unet else None
    else:
        root = turbo_config_dir("sd2")
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
        net = None
        if unet:
            net = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    out = {"vae decoder": (vae.decoder.eval(), lambda size: (torch.randn(1, 4, size // factor, size // factor),))}
    if net is not None:
        dim = net.config.cross_attention_dim

        def unet_inputs(size: int) -> tuple:
            latents = torch.randn(1, 4, size // factor, size // factor)
            return latents, torch.tensor(999), torch.randn(1, 77, dim)

        out["unet"] = (net.eval(), unet_inputs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help=f"pixels (default: 512; {TINY_SIZE} with --tiny)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--unet", action="store_true", help="the UNet too (3.5 GB more in fp32)")
    parser.add_argument("--no-openvino", action="store_true", help="eager only")
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD 2.x model (smoke run)")
    args = parser.parse_args()
    size = args.size or (TINY_SIZE if args.tiny else 512)
    device = torch.device("cpu")
    dtype = choose_precision(device).compute
    openvino = not args.no_openvino
    if openvino:
        from turbokit.openvino_backend import compile_openvino

    seconds: dict[str, list[float]] = {}
    errors: dict[str, float] = {}
    # OpenVINO's model cache for this run only; the finaliser removes it even when a row fails
    scratch = tempfile.TemporaryDirectory(prefix="bench-upsample-")
    cache = Path(scratch.name)
    for name, (module, make_inputs) in models(args.tiny, args.unet).items():
        # one module at a time, its four rows interleaved: the UNet's copies alone fill ~14 GB at full size
        rows: dict[str, Callable[[], torch.Tensor]] = {}
        with torch.no_grad():
            inputs = make_inputs(size)
            cast = tuple(x.to(dtype) if x.is_floating_point() and x.dim() > 1 else x for x in inputs)
            reference = module(*inputs)
            reference = reference.sample if hasattr(reference, "sample") else reference
            for fused in (False, True):
                twin = copy.deepcopy(module)
                if fused:
                    fuse_upsamplers(twin)
                label = f"{name}, {'fused' if fused else 'diffusers'} upsamplers"
                twin = twin.to(dtype).to(memory_format=torch.channels_last)  # as the pipeline places it
                variants = {f"{label}, eager {DTYPE_NAMES[dtype]}": twin}
                if openvino:
                    ov = copy.deepcopy(twin)
                    compile_openvino(ov, cache / ("fused" if fused else "diffusers"), name.replace(" ", "-"), dtype)
                    variants[f"{label}, openvino {DTYPE_NAMES[dtype]}"] = ov
                for row, net in variants.items():
                    call = functools.partial(net, *cast)
                    started = time.perf_counter()
                    out = call()  # the first call converts and compiles (OpenVINO) or selects kernels (oneDNN)
                    out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
                    print(f"{row}: first call {time.perf_counter() - started:.1f} s", flush=True)
                    errors[row] = ((out.float() - reference).norm() / reference.norm()).item()
                    rows[row] = call
            seconds.update({row: [] for row in rows})
            for _ in range(args.repeats):
                for row, call in rows.items():
                    started = time.perf_counter()
                    call()
                    seconds[row].append(time.perf_counter() - started)
        del rows, variants, twin
    scratch.cleanup()
    digits = 4 if args.tiny else 3
    print(f"\n{size}², batch 1, {torch.get_num_threads()} threads, median of {args.repeats} interleaved calls:")
    print("| module, upsamplers, path | median s | min s | relative error vs fp32 eager |")
    print("|---|---|---|---|")
    for row, times in seconds.items():
        print(f"| {row} | {statistics.median(times):.{digits}f} | {min(times):.{digits}f} | {errors[row]:.2e} |")
    for row in seconds:
        if "diffusers upsamplers" in row:
            twin = row.replace("diffusers upsamplers", "fused upsamplers")
            gain = statistics.median(seconds[row]) / statistics.median(seconds[twin])
            print(f"{twin.replace(', fused upsamplers', '')}: fused {gain:.2f}x as fast")


if __name__ == "__main__":
    main()
