"""turbokit against diffusers on the full-size SD-Turbo architecture (random weights, offline).

Builds SD-Turbo's UNet, VAE and OpenCLIP-H text encoder from the shipped configs with random
weights (speed and memory only — random weights say nothing about quality), then times, interleaved
in one process so that the machine's state affects every row alike:

  diffusers fp32 (its default), diffusers bf16/fp16, turbokit at its defaults, turbokit fp32.

Each call uses a new prompt, so turbokit's prompt cache gives it no advantage. Prints the medians,
the ratios the issue's targets are stated in, and each call's peak resident-memory growth.

    python benchmarks/bench_inference.py [--size 512] [--steps 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import EulerDiscreteScheduler
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel

from turbokit.configs import turbo_config_dir
from turbokit.loading import LoadedModel
from turbokit.pipeline import TurboPipeline
from turbokit.precision import choose_precision, parse_device
from turbokit.tokenizer import PAD_OPENCLIP, clip_tokenizer

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def random_sd_turbo() -> dict[str, object]:
    """SD-Turbo's components with random weights, from the configs turbokit ships."""
    root = turbo_config_dir("sd2")
    torch.manual_seed(0)
    return {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        "tokenizer": clip_tokenizer(PAD_OPENCLIP),
        "scheduler": EulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_gib(self) -> float:
        return (self.peak - self.base) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    device = parse_device(args.device)
    fast = choose_precision(device).compute  # turbokit's default compute dtype here
    fast_name = DTYPE_NAMES[fast]

    print(f"building random-weight SD-Turbo (device {device}, {torch.get_num_threads()} threads) ...", flush=True)
    base = random_sd_turbo()

    def diffusers_pipe(dtype: torch.dtype) -> StableDiffusionPipeline:
        parts = base if dtype == torch.float32 else copy.deepcopy(base)
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device, dtype)

    def turbokit_pipe(dtype: str | None) -> TurboPipeline:
        parts = copy.deepcopy(base)
        return TurboPipeline(LoadedModel("sd2", parts, "sd-turbo-random"), device, choose_precision(device, dtype))

    rows: dict[str, Callable[[str], object]] = {}
    d32 = diffusers_pipe(torch.float32)
    dfast = diffusers_pipe(fast)
    t_def = turbokit_pipe(None)
    t32 = turbokit_pipe("fp32")
    common = dict(num_inference_steps=args.steps, guidance_scale=0.0, height=args.size, width=args.size)
    rows["diffusers fp32 (default)"] = lambda p: d32(p, generator=torch.Generator().manual_seed(0), **common)
    rows[f"diffusers {fast_name}"] = lambda p: dfast(p, generator=torch.Generator().manual_seed(0), **common)
    rows[f"turbokit default ({fast_name})"] = lambda p: t_def(
        p, steps=args.steps, seed=0, width=args.size, height=args.size
    )
    rows["turbokit fp32"] = lambda p: t32(p, steps=args.steps, seed=0, width=args.size, height=args.size)

    times: dict[str, list[float]] = {name: [] for name in rows}
    peaks: dict[str, float] = dict.fromkeys(rows, 0.0)
    for run in rows.values():  # warm-up: first-call allocations and oneDNN kernel selection
        run("warm-up prompt")
    for rep in range(args.repeats):
        for name, run in rows.items():
            prompt = f"a photograph of an astronaut riding a horse, variant {rep} for {name}"
            with PeakRSS() as mem:
                start = time.perf_counter()
                run(prompt)
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mem.growth_gib)
            print(f"  rep {rep}: {name:<28} {times[name][-1]:.2f} s", flush=True)

    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"\nSD-Turbo architecture, random weights, {args.size}x{args.size}, {args.steps} step(s), "
        f"batch 1, {device}, {torch.get_num_threads()} threads, median of {args.repeats}:"
    )
    print("| pipeline | median s | min s | peak RSS growth per call GiB |")
    print("|---|---|---|---|")
    for name in rows:
        print(f"| {name} | {med[name]:.2f} | {min(times[name]):.2f} | {peaks[name]:.2f} |")
    default_name = f"turbokit default ({fast_name})"
    vs_default = med["diffusers fp32 (default)"] / med[default_name]
    vs_same = med[f"diffusers {fast_name}"] / med[default_name]
    print(f"\nturbokit default vs diffusers default: {vs_default:.2f}x faster (target >= 2)")
    print(f"turbokit vs diffusers at {fast_name}: {vs_same:.2f}x faster (target >= 1.1)")
    print(f"turbokit vs diffusers at fp32: {med['diffusers fp32 (default)'] / med['turbokit fp32']:.2f}x faster")


if __name__ == "__main__":
    main()
