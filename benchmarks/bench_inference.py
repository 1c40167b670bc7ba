"""turbokit against diffusers and OpenVINO on the full-size SD-Turbo architecture (random weights, offline).

Builds SD-Turbo's UNet, VAE and OpenCLIP-H text encoder from the shipped configs with random
weights (speed and memory only — random weights say nothing about quality), then times, interleaved
in one run so that the machine's state affects every row alike:

  diffusers fp32 (its default), diffusers bf16/fp16, turbokit at its defaults, turbokit fp32,
  with --quantize int8 turbokit with its UNet's linear layers in int8 (torchao; CPU), and
  with --openvino OpenVINO's own pipeline (optimum-intel) at turbokit's default precision.

OpenVINO runs in its own venv (.venv-openvino, `make bench-openvino-env`; its pins conflict with
ours): the same weights are saved once as a diffusers folder under --cache-dir, which
benchmarks/bench_openvino.py exports to OpenVINO IR once, and a worker process of that venv answers
one call at a time in turn with the in-process rows (its timings are taken inside the worker).

Each call uses a new prompt, so turbokit's prompt cache gives it no advantage. Prints the medians,
the ratios the issues' targets are stated in, and each call's peak resident-memory growth; with
--quantize, also the PSNR of the int8 images against turbokit's default-precision ones (same prompts and
seed; with random weights it measures numerical drift, not the quality of a trained model's images).

    python benchmarks/bench_inference.py [--size 512] [--steps 1] [--repeats 3] [--openvino]
    python benchmarks/bench_inference.py --tiny --openvino --repeats 1     # smoke run, tiny model, seconds
    python benchmarks/bench_inference.py --tiny --quantize int8 --repeats 1
    python benchmarks/bench_inference.py --compile aot          # adds turbokit compiled ahead of time
    python benchmarks/bench_inference.py --openvino --compile openvino --tiny-decoder --no-fp32   # issue 6 §5

--compile may be given more than once; --tiny-decoder adds, for turbokit at its default and for each
compiled mode, a row that decodes with a random full-size AutoencoderTiny (TAESD's architecture) instead of
the VAE. turbokit's eager and OpenVINO rows also report seconds per component (text encoder, UNet, decoder).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.upsampling import Upsample2D
from diffusers.schedulers import EulerDiscreteScheduler
from diffusers.utils import logging as diffusers_logging
from peak_rss import PeakRSS
from timing import time_forward
from transformers import CLIPTextConfig, CLIPTextModel

from turbokit.compile import COMPILE_MODES
from turbokit.configs import turbo_config_dir
from turbokit.fused_upsample import FusedUpsample2D
from turbokit.info import DTYPE_NAMES
from turbokit.loading import LoadedModel
from turbokit.pipeline import TurboPipeline
from turbokit.precision import choose_precision, parse_device
from turbokit.quantize import psnr
from turbokit.tiny import TINY_SIZE, tiny_components
from turbokit.tokenizer import PAD_OPENCLIP, clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OPENVINO_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
OPENVINO_PRECISIONS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}  # its INFERENCE_PRECISION_HINT


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


@dataclass
class Call:
    """One timed call: seconds, peak resident-memory growth, and per-component seconds where known."""

    seconds: float
    peak_growth_gib: float
    parts: dict[str, float] = field(default_factory=dict)


def in_process(generate: Callable[[str], object], parts: dict[str, float] | None = None) -> Callable[[str], Call]:
    """A timed row; `parts` is a `time_parts` dict, reset before each call and copied into its result."""

    def run(prompt: str) -> Call:
        if parts is not None:
            parts.clear()
        with PeakRSS() as mem:
            start = time.perf_counter()
            generate(prompt)
            seconds = time.perf_counter() - start
        return Call(seconds, mem.growth_gib, dict(parts or {}))

    return run


def time_parts(pipe: TurboPipeline) -> dict[str, float]:
    """Wrap the pipeline's text encoders, UNet and decoders so that each call's seconds per component add up in
    the returned dict. Not for torch.compile's modes: the wrapper would be traced into the graph."""
    seconds: dict[str, float] = {}
    for encoder in pipe.text_encoders:
        time_forward(encoder, "text_encoder", seconds)
    time_forward(pipe.unet, "unet", seconds)
    time_forward(pipe.vae.decoder, "vae_decode", seconds)
    if pipe.tiny_vae is not None:
        time_forward(pipe.tiny_vae.decoder, "vae_decode", seconds)
    return seconds


def full_decoder(pipe: TurboPipeline) -> TurboPipeline:
    """The same pipeline (shared weights and compiled models) decoding with the full VAE."""
    twin = copy.copy(pipe)
    twin.tiny_vae = None
    return twin


def with_diffusers_upsamplers(pipe: TurboPipeline, run: Callable[[str], Call], prompt: str) -> Call:
    """One call of `run` with the pipeline's UNet and VAE upsampling as diffusers' `Upsample2D` does (nearest ×2,
    then a 3×3 convolution), then turbokit's transposed convolutions again: the A/B of `turbokit.fused_upsample`
    on the same weights, at no extra memory."""
    modules = [m for model in (pipe.unet, pipe.vae) for m in model.modules() if isinstance(m, FusedUpsample2D)]
    for module in modules:
        module.__class__ = Upsample2D
    try:
        return run(prompt)
    finally:
        for module in modules:
            module.__class__ = FusedUpsample2D


def save_diffusers_folder(parts: dict[str, object], folder: Path) -> Path:
    """`parts` as a diffusers folder, written once: kept while torch, diffusers and transformers are unchanged
    (the random weights are drawn from a fixed seed)."""
    stamp = folder / "turbokit-bench.json"
    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == versions:
        return folder
    print(f"saving the random weights as a diffusers folder in {folder} (once) ...", flush=True)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    stamp.write_text(json.dumps(versions))
    return folder


class OpenVINOWorker:
    """benchmarks/bench_openvino.py --serve in .venv-openvino: one call per request, timed inside the worker."""

    def __init__(self, folder: Path, size: int, steps: int, precision: str, threads: int, log: Path) -> None:
        self.log = log
        command = [str(OPENVINO_PYTHON), str(ROOT / "benchmarks" / "bench_openvino.py"), str(folder), "--serve"]
        command += ["--size", str(size), "--steps", str(steps), "--precision", precision, "--threads", str(threads)]
        with open(log, "w") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.setup = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"the OpenVINO worker stopped (log: {self.log}):\n{tail}")
        return json.loads(line)

    def __call__(self, prompt: str) -> Call:
        self.process.stdin.write(json.dumps({"prompt": prompt, "seed": 0}) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        parts = {name: answer[f"{name}_s"] for name in ("text_encoder", "unet", "vae_decode")}
        return Call(answer["total_s"], answer["peak_rss_growth_gib"], parts)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def start_openvino(
    parts: dict[str, object], args: argparse.Namespace, device: torch.device, fast_name: str
) -> OpenVINOWorker | None:
    """The OpenVINO worker, ready (exported and compiled), or None with the reason printed."""
    if device.type != "cpu":
        print(f"skipping OpenVINO: it runs on the CPU here, the benchmark on {device}", flush=True)
        return None
    if not OPENVINO_PYTHON.exists():
        print(
            f"skipping OpenVINO: {OPENVINO_PYTHON.parent.parent} is missing; `make bench-openvino-env` makes it",
            flush=True,
        )
        return None
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    folder = save_diffusers_folder(parts, args.cache_dir / ("tiny-sd2" if args.tiny else "sd-turbo-random"))
    print("starting OpenVINO (exports to IR on the first run) ...", flush=True)
    start = time.perf_counter()
    log = args.cache_dir / "openvino-worker.log"
    worker = OpenVINOWorker(folder, args.size, args.steps, OPENVINO_PRECISIONS[fast_name], torch.get_num_threads(), log)
    setup = worker.setup
    export = "IR cached" if setup["export_s"] is None else f"exported to IR in {setup['export_s']:.1f} s"
    print(
        f"OpenVINO {setup['openvino']} (optimum-intel {setup['optimum_intel']}) ready in "
        f"{time.perf_counter() - start:.1f} s: {export}, loaded and compiled in {setup['load_s']:.1f} s, "
        f"precision {setup['precision']}, {setup['threads']} threads; log {log}",
        flush=True,
    )
    return worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help=f"pixels (default: 512; {TINY_SIZE} with --tiny)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD 2.x model instead (smoke run)")
    parser.add_argument("--openvino", action="store_true", help="add OpenVINO's pipeline (needs .venv-openvino)")
    parser.add_argument(
        "--quantize", choices=["int8"], default=None, help="add turbokit with the UNet in int8 (torchao, CPU only)"
    )
    parser.add_argument(
        "--compile", choices=COMPILE_MODES, action="append", default=[], help="add turbokit compiled in this mode"
    )
    parser.add_argument(
        "--tiny-decoder", action="store_true", help="add turbokit rows that decode with a random AutoencoderTiny"
    )
    parser.add_argument("--no-fp32", action="store_true", help="leave out the fp32 rows (saves memory and time)")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="add the default row with diffusers' own upsamplers (turbokit.fused_upsample off; the same weights)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=ROOT / "build" / "bench-inference", help="saved weights and IR for OpenVINO"
    )
    args = parser.parse_args()
    args.size = args.size or (TINY_SIZE if args.tiny else 512)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    device = parse_device(args.device)
    fast = choose_precision(device).compute  # turbokit's default compute dtype here
    fast_name = DTYPE_NAMES[fast]

    model_name = "tiny SD 2.x" if args.tiny else "SD-Turbo architecture"
    print(f"building random-weight {model_name} (device {device}, {torch.get_num_threads()} threads) ...", flush=True)
    base = tiny_components("sd2") if args.tiny else random_sd_turbo()
    # OpenVINO first: its export, the most memory-hungry step, runs before the other pipelines exist
    openvino = start_openvino(base, args, device, fast_name) if args.openvino else None

    def diffusers_pipe(dtype: torch.dtype) -> StableDiffusionPipeline:
        parts = base if dtype == torch.float32 else copy.deepcopy(base)
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device, dtype)

    torch.manual_seed(1)
    tiny_decoder = AutoencoderTiny() if args.tiny_decoder else None  # TAESD's layout for SD's 4-channel latents

    def turbokit_pipe(dtype: str | None, quantize: str | None = None, compile: str | None = None) -> TurboPipeline:
        parts = copy.deepcopy(base)
        model = LoadedModel("sd2", parts, "sd-turbo-random")
        precision = choose_precision(device, dtype)
        decoder = copy.deepcopy(tiny_decoder) if tiny_decoder is not None and dtype is None else None
        return TurboPipeline(model, device, precision, decoder, quantize=quantize, compile=compile)

    def turbokit_rows(name: str, pipe: TurboPipeline, timed: bool = True) -> dict[str, float] | None:
        """The pipeline's row with the full VAE, and with --tiny-decoder one with the tiny decoder; returns
        the dict its per-component seconds go to."""
        parts = time_parts(pipe) if timed else None
        full = full_decoder(pipe)
        rows[name] = in_process(lambda p: full(p, steps=args.steps, seed=0, width=args.size, height=args.size), parts)
        if pipe.tiny_vae is not None:
            tiny = lambda p: pipe(p, steps=args.steps, seed=0, width=args.size, height=args.size)  # noqa: E731
            rows[f"{name} + tiny decoder"] = in_process(tiny, parts)
        return parts

    rows: dict[str, Callable[[str], Call]] = {}
    common = dict(num_inference_steps=args.steps, guidance_scale=0.0, height=args.size, width=args.size)
    if not args.no_fp32:
        d32 = diffusers_pipe(torch.float32)
        rows["diffusers fp32 (default)"] = in_process(
            lambda p: d32(p, generator=torch.Generator().manual_seed(0), **common)
        )
    dfast = diffusers_pipe(fast)
    rows[f"diffusers {fast_name}"] = in_process(
        lambda p: dfast(p, generator=torch.Generator().manual_seed(0), **common)
    )
    if openvino:
        rows[f"openvino {fast_name} (optimum-intel)"] = openvino
    t_def = turbokit_pipe(None)
    t_def_parts = turbokit_rows(f"turbokit default ({fast_name})", t_def)
    if args.unfused:
        full_def = full_decoder(t_def)
        unfused = in_process(
            lambda p: full_def(p, steps=args.steps, seed=0, width=args.size, height=args.size), t_def_parts
        )
        rows[f"turbokit default ({fast_name}), upsamplers unfused"] = lambda p: with_diffusers_upsamplers(
            t_def, unfused, p
        )
    if not args.no_fp32:
        t32 = turbokit_pipe("fp32")
        rows["turbokit fp32"] = in_process(
            lambda p: t32(p, steps=args.steps, seed=0, width=args.size, height=args.size)
        )
    # OpenVINO rows load the weights from a diffusers folder, as a user's model would (and so start warm when
    # their conversion is cached: the UNet's weights are then not read at all)
    folder = args.cache_dir / ("tiny-sd2" if args.tiny else "sd-turbo-random")
    tiny_folder = args.cache_dir / "taesd-random"
    if "openvino" in args.compile:
        save_diffusers_folder(base, folder)
        if tiny_decoder is not None:
            tiny_decoder.save_pretrained(tiny_folder)
    if args.no_fp32:
        del base  # every in-memory pipeline holds its own copy by now: 5 GB back at full size

    def compiled_pipe(mode: str, quantize: str | None = None) -> TurboPipeline:
        if mode != "openvino":
            return turbokit_pipe(None, quantize, mode)
        tiny = tiny_folder if tiny_decoder is not None else None
        return TurboPipeline.from_pretrained(folder, device=device, tiny_vae=tiny, quantize=quantize, compile=mode)

    def first_calls(name: str, pipe: TurboPipeline) -> None:
        for each in (full_decoder(pipe), pipe) if pipe.tiny_vae is not None else (pipe,):
            start = time.perf_counter()  # the first call compiles (or loads the cached compilation)
            each("first call", steps=args.steps, seed=0, width=args.size, height=args.size)
            print(f"{name}: first call (compilation) {time.perf_counter() - start:.1f} s", flush=True)

    compiled: dict[str, TurboPipeline] = {}
    for mode in args.compile:
        name = f"turbokit --compile {mode} ({fast_name})"
        compiled[mode] = compiled_pipe(mode)
        first_calls(name, compiled[mode])
        turbokit_rows(name, compiled[mode], timed=mode in ("aot", "openvino"))

    quantized: dict[str, tuple[TurboPipeline, TurboPipeline]] = {}  # row → (int8 pipeline, its reference)
    if args.quantize and "openvino" in args.compile:  # NNCF's int8, calibrated at the first call
        name = f"turbokit --compile openvino --quantize {args.quantize}"
        quantized[name] = (compiled_pipe("openvino", args.quantize), compiled["openvino"])
        first_calls(name, quantized[name][0])
        turbokit_rows(name, quantized[name][0])
    elif args.quantize:
        name = f"turbokit {args.quantize} ({fast_name} elsewhere)"
        start = time.perf_counter()
        quantized[name] = (turbokit_pipe(None, args.quantize), t_def)
        seconds = time.perf_counter() - start
        print(f"built {name} in {seconds:.1f} s (copy of the weights, placement, quantization)", flush=True)
        turbokit_rows(name, quantized[name][0])

    digits = 4 if args.tiny else 2
    calls: dict[str, list[Call]] = {name: [] for name in rows}
    for run in rows.values():  # warm-up: first-call allocations and oneDNN kernel selection
        run("warm-up prompt")
    for rep in range(args.repeats):
        for name, run in rows.items():
            calls[name].append(run(f"a photograph of an astronaut riding a horse, variant {rep} for {name}"))
            print(f"  rep {rep}: {name:<32} {calls[name][-1].seconds:.{digits}f} s", flush=True)
    if openvino:
        openvino.close()

    med = {name: statistics.median(call.seconds for call in c) for name, c in calls.items()}
    print(
        f"\n{model_name}, random weights, {args.size}x{args.size}, {args.steps} step(s), "
        f"batch 1, {device}, {torch.get_num_threads()} threads, median of {args.repeats}:"
    )
    print("| pipeline | median s | min s | peak RSS growth per call GiB |")
    print("|---|---|---|---|")
    for name, c in calls.items():
        fastest, peak = min(call.seconds for call in c), max(call.peak_growth_gib for call in c)
        print(f"| {name} | {med[name]:.{digits}f} | {fastest:.{digits}f} | {peak:.2f} |")
    for name, c in calls.items():
        if c[0].parts:
            parts = ", ".join(
                f"{part} {statistics.median(call.parts[part] for call in c):.{digits}f}" for part in c[0].parts
            )
            print(f"{name}, median s per component: {parts}")
    default_name = f"turbokit default ({fast_name})"
    vs_same = med[f"diffusers {fast_name}"] / med[default_name]
    print()
    if not args.no_fp32:
        vs_default = med["diffusers fp32 (default)"] / med[default_name]
        print(f"turbokit default vs diffusers default: {vs_default:.2f}x faster (target >= 2)")
        print(f"turbokit vs diffusers at fp32: {med['diffusers fp32 (default)'] / med['turbokit fp32']:.2f}x faster")
    print(f"turbokit vs diffusers at {fast_name}: {vs_same:.2f}x faster (target >= 1.1)")
    if openvino:
        reference = med[f"openvino {fast_name} (optimum-intel)"]
        for name in med:
            if name.startswith("turbokit") and "tiny decoder" not in name:
                print(f"{name} vs OpenVINO at {fast_name}: {reference / med[name]:.2f}x faster (target >= 1.0)")
    for name, (pipe, reference) in quantized.items():
        print(f"{name}: {med[name]:.{digits}f} s median (target < 1.0 s at 512², 1 step, on the issue's machine)")
        pipe, reference = full_decoder(pipe), full_decoder(reference)  # the UNet's error through the real VAE
        quality = min(
            psnr(
                pipe(prompt, steps=args.steps, seed=0, width=args.size, height=args.size).pixels,
                reference(prompt, steps=args.steps, seed=0, width=args.size, height=args.size).pixels,
            )
            for prompt in ("a photograph of an astronaut riding a horse", "a red circle on a blue background")
        )
        print(f"{name} vs the same engine in {fast_name}, PSNR {quality:.1f} dB (target >= 30)")


if __name__ == "__main__":
    main()
