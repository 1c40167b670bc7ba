"""Throughput and latency of one turbokit path (issue 6 §4): img/s at batch 1 and at the best batch, p50/p95.

Meant for the GPU machine (`--device cuda`, fp16, optionally `--compile reduce-overhead` for CUDA graphs at
static shapes), it runs anywhere: the full-size SD-Turbo architecture with random weights (speed only), or
`--model` for a real folder, or `--tiny` for a smoke run. Each batch size gets warm-up calls first (compilation,
CUDA graph capture, cuDNN's algorithm search), then timed calls with a new prompt each; on CUDA every call
ends with a synchronisation, so the time is the image's, not the launch's.

    python benchmarks/bench_throughput.py --device cuda --batches 1,2,4,8,16 [--compile reduce-overhead]
    python benchmarks/bench_throughput.py --device cuda --tiny-decoder     # decode with a random AutoencoderTiny
    python benchmarks/bench_throughput.py --tiny --device cpu --calls 5     # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from bench_inference import random_sd_turbo
from diffusers import AutoencoderTiny

from turbokit.compile import COMPILE_MODES
from turbokit.loading import LoadedModel
from turbokit.pipeline import TurboPipeline
from turbokit.precision import choose_precision, parse_device
from turbokit.tiny import TINY_SIZE, tiny_components


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the sorted values."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def build(args: argparse.Namespace, device: torch.device) -> TurboPipeline:
    if args.model:
        return TurboPipeline.from_pretrained(
            args.model, device=device, dtype=args.dtype, tiny_vae=args.tiny_vae, compile=args.compile
        )
    tiny_vae = None
    if args.tiny_decoder:
        torch.manual_seed(1)
        tiny_vae = AutoencoderTiny()  # TAESD's layout for SD's 4-channel latents, random weights
    parts = tiny_components("sd2") if args.tiny else random_sd_turbo()
    model = LoadedModel("sd2", copy.deepcopy(parts), "sd-turbo-random")
    return TurboPipeline(model, device, choose_precision(device, args.dtype), tiny_vae, compile=args.compile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--model", default=None, help="a model folder or file instead of random SD-Turbo weights")
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD 2.x model (smoke run)")
    parser.add_argument("--tiny-decoder", action="store_true", help="decode with a random full-size AutoencoderTiny")
    parser.add_argument("--tiny-vae", default=None, help="with --model: decode with this AutoencoderTiny folder")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 512; the tiny size with --tiny)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per batch size first")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    size = args.size or (TINY_SIZE if args.tiny else 512)
    device = parse_device(args.device)
    pipe = build(args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"{pipe.model_name}, {size}², {args.steps} step(s), {device} ({pipe.precision.compute}), ", end="")
    print(f"compile {args.compile}, decoder {'tiny' if pipe.tiny_vae is not None else 'full'}", flush=True)
    print("| batch | img/s | p50 ms per call | p95 ms per call | first call s |")
    print("|---|---|---|---|---|")
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:

        def call(batch: int, n: int) -> float:
            prompts = [f"a photograph of an astronaut riding a horse, take {n}.{i}" for i in range(batch)]
            start = time.perf_counter()
            pipe(prompts, steps=args.steps, seed=n, width=size, height=size)
            sync()
            return time.perf_counter() - start

        first = call(batch, 0)  # compilation / graph capture happens here
        for n in range(1, args.warmup):
            call(batch, n)
        calls = [call(batch, args.warmup + n) for n in range(args.calls)]
        row = {
            "batch": batch,
            "images_per_s": batch / statistics.median(calls),
            "p50_ms": percentile(calls, 50) * 1000,
            "p95_ms": percentile(calls, 95) * 1000,
            "first_call_s": first,
        }
        results.append(row)
        print(
            f"| {batch} | {row['images_per_s']:.2f} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {first:.2f} |",
            flush=True,
        )
    best = max(results, key=lambda r: r["images_per_s"])
    first = results[0]
    print(f"\nbatch {first['batch']}: {first['images_per_s']:.2f} img/s; ", end="")
    print(f"best: {best['images_per_s']:.2f} img/s at batch {best['batch']}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "size": size, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
