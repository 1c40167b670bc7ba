"""OpenVINO's own Stable Diffusion pipeline (optimum-intel) on a diffusers folder: the rival of issue 6 §5.

Runs in .venv-openvino (`make bench-openvino-env`; optimum-intel's pins conflict with turbokit's), not
in turbokit's venv. Exports the folder to OpenVINO IR once, into `<folder>-openvino` beside it
(re-exported only when the folder's files change), reshapes the pipeline to static shapes for the
given size (batch 1, as FastSD CPU reshapes its pipelines) and compiles it for the CPU with the inference precision
asked for (OpenVINO's INFERENCE_PRECISION_HINT, passed as optimum-intel's `ov_config`). Weights are
exported unquantized (`load_in_8bit=False`). Each call is text-to-image at guidance 0 with a new
prompt, timed whole and per component (text encoder, UNet, VAE decode).

    .venv-openvino/bin/python benchmarks/bench_openvino.py FOLDER [--size 512] [--steps 1] [--repeats 3]

prints one JSON line on stdout: export and load times, median and min of the calls, per-component
medians, peak resident-memory growth per call. With --serve it instead reads one JSON request per
line on stdin ({"prompt": ..., "seed": ...}) and answers each with one JSON line, after a first line
{"ready": ...}: bench_inference.py --openvino uses it to interleave OpenVINO with the other pipelines.
Library messages go to stderr; stdout carries the JSON only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import TextIO

import torch
from diffusers.utils import logging as diffusers_logging
from optimum.intel import OVDiffusionPipeline
from peak_rss import PeakRSS
from safetensors import safe_open
from safetensors.torch import save_file
from timing import time_forward
from transformers.utils import logging as transformers_logging

PRECISIONS = ("bf16", "f16", "f32")  # INFERENCE_PRECISION_HINT values
COMPONENTS = {"text_encoder": "text_encoder", "unet": "unet", "vae_decode": "vae_decoder"}  # report name: attribute
FINGERPRINT = "turbokit-source.json"


def ir_dir_for(model_dir: Path) -> Path:
    return model_dir.parent / f"{model_dir.name}-openvino"


def fingerprint(model_dir: Path) -> dict[str, list[int]]:
    """Size and modification time of every file in the folder: a re-saved folder is exported again."""
    return {
        str(path.relative_to(model_dir)): [path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(model_dir.rglob("*"))
        if path.is_file()
    }


def classic_name(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def with_classic_text_encoders(model_dir: Path, scratch: Path) -> Path:
    """`model_dir`, or a copy of it in `scratch` (links, but for rewritten files) whose CLIP text encoders'
    weights carry the classic names.

    turbokit's transformers (5.24) saves CLIPTextModel without the `text_model.` prefix; this venv's
    transformers 5.5 reports every such weight as unexpected and would export a randomly initialised
    text encoder.
    """
    renamed = {}
    for path in sorted(model_dir.glob("text_encoder*/*.safetensors")):
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if any(classic_name(key) != key for key in keys):
                renamed[path.relative_to(model_dir)] = {classic_name(key): f.get_tensor(key) for key in keys}
    if not renamed:
        return model_dir
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(model_dir, scratch, copy_function=os.symlink)
    for relative, tensors in renamed.items():
        (scratch / relative).unlink()
        save_file(tensors, scratch / relative, metadata={"format": "pt"})
    for index in {scratch / relative.parent / "model.safetensors.index.json" for relative in renamed}:
        if index.exists():  # sharded weights: the index names them too
            data = json.loads(index.read_text())
            data["weight_map"] = {classic_name(key): file for key, file in data["weight_map"].items()}
            index.unlink()
            index.write_text(json.dumps(data))
    return scratch


def export_if_needed(model_dir: Path, ir_dir: Path) -> float | None:
    """Export `model_dir` to OpenVINO IR in `ir_dir` unless it is there already; the seconds it took, or None."""
    stamp = ir_dir / FINGERPRINT
    if stamp.is_file() and json.loads(stamp.read_text()) == fingerprint(model_dir):
        return None
    start = time.perf_counter()
    partial = ir_dir.with_name(ir_dir.name + ".partial")  # an interrupted export never looks finished
    scratch = ir_dir.with_name(ir_dir.name + ".source")
    shutil.rmtree(partial, ignore_errors=True)
    source = with_classic_text_encoders(model_dir, scratch)
    pipe = OVDiffusionPipeline.from_pretrained(source, export=True, compile=False, load_in_8bit=False)
    pipe.save_pretrained(partial)
    del pipe
    shutil.rmtree(scratch, ignore_errors=True)
    (partial / FINGERPRINT).write_text(json.dumps(fingerprint(model_dir)))
    shutil.rmtree(ir_dir, ignore_errors=True)
    partial.rename(ir_dir)
    return time.perf_counter() - start


def load(ir_dir: Path, size: int, precision: str, threads: int) -> OVDiffusionPipeline:
    ov_config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
    }
    pipe = OVDiffusionPipeline.from_pretrained(ir_dir, compile=False, ov_config=ov_config)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    # optimum-intel sizes the UNet's batch for classifier-free guidance (2 per image); at guidance 0 it is 1
    shapes = {i.get_any_name(): list(i.get_partial_shape()) for i in pipe.unet.model.inputs}
    pipe.unet.model.reshape({name: [1, *dims[1:]] for name, dims in shapes.items() if dims})
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_components(pipe: OVDiffusionPipeline) -> dict[str, float]:
    """Wrap each component's forward so that its seconds add up in the returned dict (reset it per call)."""
    seconds = dict.fromkeys(COMPONENTS, 0.0)
    for name, attribute in COMPONENTS.items():
        time_forward(getattr(pipe, attribute), name, seconds)
    return seconds


def generate(pipe: OVDiffusionPipeline, seconds: dict[str, float], prompt: str, seed: int, args) -> dict:
    """One text-to-image call: its image, total and per-component seconds, peak resident-memory growth."""
    for name in seconds:
        seconds[name] = 0.0
    with PeakRSS() as mem:
        start = time.perf_counter()
        image = pipe(
            prompt,
            num_inference_steps=args.steps,
            guidance_scale=0.0,
            height=args.size,
            width=args.size,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        total = time.perf_counter() - start
    return {
        "image": image,
        "total_s": total,
        **{f"{name}_s": s for name, s in seconds.items()},
        "peak_rss_growth_gib": mem.growth_gib,
    }


def serve(pipe, seconds, args, out: TextIO) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        call = generate(pipe, seconds, request["prompt"], request.get("seed", 0), args)
        del call["image"]
        print(json.dumps(call), file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a diffusers folder (Stable Diffusion layout)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="INFERENCE_PRECISION_HINT")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's thread count here")
    parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin, one per line")
    parser.add_argument("--image", type=Path, default=None, help="after timing, write --prompt's image (seed 0) here")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    args = parser.parse_args()

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print, from Python or C++, goes to stderr
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    threads = args.threads or torch.get_num_threads()
    model_dir = args.model.resolve()
    ir_dir = ir_dir_for(model_dir)

    export_s = export_if_needed(model_dir, ir_dir)
    start = time.perf_counter()
    pipe = load(ir_dir, args.size, args.precision, threads)
    load_s = time.perf_counter() - start
    seconds = time_components(pipe)
    setup = {
        "ir": str(ir_dir),
        "export_s": export_s,
        "load_s": load_s,
        "precision": pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string(),
        "threads": threads,
        "size": args.size,
        "steps": args.steps,
        "openvino": version("openvino"),
        "optimum_intel": version("optimum-intel"),
    }
    if args.serve:
        print(json.dumps({"ready": True, **setup}), file=out)
        serve(pipe, seconds, args, out)
        return

    for i in range(args.warmup):
        generate(pipe, seconds, f"warm-up prompt {i}", 0, args)
    calls = [generate(pipe, seconds, f"{args.prompt}, variant {i}", 0, args) for i in range(args.repeats)]
    totals = [call["total_s"] for call in calls]
    summary = {
        **setup,
        "repeats": args.repeats,
        "median_s": statistics.median(totals),
        "min_s": min(totals),
        "components_median_s": {name: statistics.median(c[f"{name}_s"] for c in calls) for name in COMPONENTS},
        "peak_rss_growth_gib": max(call["peak_rss_growth_gib"] for call in calls),
    }
    print(json.dumps(summary), file=out)
    if args.image:
        generate(pipe, seconds, args.prompt, 0, args)["image"].save(args.image)


if __name__ == "__main__":
    main()
