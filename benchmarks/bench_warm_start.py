"""Launch to first image, cold and warm, for each compile mode (issue 6 §1 and §5: warm start ≤ 2 × one image).

Saves the full-size SD-Turbo architecture with random weights as a diffusers folder (once, as
bench_inference.py does), then for each mode launches fresh Python processes that each load the folder,
make one image and then a few more: the first launch of a mode starts with an empty turbokit cache
(cold), the second finds what the first wrote (warm). "launch → image" is wall time from starting the
process (imports included) to the first image; "image" is the median of the images after it.

    python benchmarks/bench_warm_start.py [--modes eager,aot] [--size 512] [--steps 1]
    python benchmarks/bench_warm_start.py --tiny                # smoke run, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from turbokit.compile import COMPILE_MODES

ROOT = Path(__file__).resolve().parents[1]


def child(folder: str, mode: str, size: int, steps: int, images: int, prefetch: bool) -> None:
    """One launch: load, first image, then `images` more; prints a JSON line. With `--compile openvino` it starts,
    as the CLI does, by prefetching what the last launch compiled (`turbokit.openvino_warm`)."""
    if mode == "openvino" and prefetch:
        from turbokit import openvino_warm

        openvino_warm.start(folder)
    from turbokit.pipeline import TurboPipeline

    pipe = TurboPipeline.from_pretrained(folder, compile=None if mode == "eager" else mode)
    pipe("a first prompt", steps=steps, seed=0, width=size, height=size)
    first = time.time()
    seconds = []
    for n in range(images):
        start = time.perf_counter()
        pipe(f"another prompt, number {n}", steps=steps, seed=n, width=size, height=size)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"first_image_at": first, "image_s": statistics.median(seconds)}), flush=True)


def launch(
    folder: Path, mode: str, size: int, steps: int, images: int, cache: Path, prefetch: bool
) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(folder), "--modes", mode, "--size", str(size)]
    command += ["--steps", str(steps), "--images", str(images)] + ([] if prefetch else ["--no-prefetch"])
    # a fresh cache per mode: turbokit's root, and inductor's under it (not a directory set by the caller)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"TURBOKIT_CACHE": str(cache)}
    started = time.time()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:  # the child's own error, not the parent's CalledProcessError, says what went wrong
        tail = "\n".join(out.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"the {mode} launch failed (exit {out.returncode}); the end of its stderr:\n{tail}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"launch_to_image_s": result["first_image_at"] - started, "image_s": result["image_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="eager,aot", help="comma-separated: eager and --compile modes")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 512; the tiny size with --tiny)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--images", type=int, default=3, help="images after the first, for the steady time")
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD 2.x model instead (smoke run)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "build" / "bench-warm-start")
    parser.add_argument("--no-prefetch", action="store_true", help="openvino: without the CLI's background prefetch")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.modes.split(",")) - {"eager", *COMPILE_MODES})
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}: use eager or one of {', '.join(COMPILE_MODES)}")
    if args.child:
        return child(args.child, args.modes, args.size, args.steps, args.images, not args.no_prefetch)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_inference import random_sd_turbo, save_diffusers_folder

    from turbokit.tiny import TINY_SIZE, tiny_components

    size = args.size or (TINY_SIZE if args.tiny else 512)
    folder = args.cache_dir / ("tiny-sd2" if args.tiny else "sd-turbo-random")
    save_diffusers_folder(tiny_components("sd2") if args.tiny else random_sd_turbo(), folder)
    print(f"{'tiny SD 2.x' if args.tiny else 'SD-Turbo architecture'}, random weights, {size}², {args.steps} step(s)")
    print("| mode | launch | launch → first image s | one image s | launch / image |")
    print("|---|---|---|---|---|")
    for mode in args.modes.split(","):
        cache = args.cache_dir / f"cache-{mode}"
        shutil.rmtree(cache, ignore_errors=True)
        prefetch = not args.no_prefetch
        launches = [("cold", prefetch), ("warm", prefetch)]
        if mode == "openvino" and prefetch:  # the prefetch's worth: the same warm launch without it
            launches += [("warm, no prefetch", False), ("warm", True)]
        for launch_name, with_prefetch in launches:
            r = launch(folder, mode, size, args.steps, args.images, cache, with_prefetch)
            ratio = r["launch_to_image_s"] / r["image_s"]
            row = f"| {mode} | {launch_name} | {r['launch_to_image_s']:.2f} | {r['image_s']:.3f} | {ratio:.1f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
