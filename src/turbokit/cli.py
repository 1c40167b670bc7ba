"""The `turbokit` command line: generate, img2img, video, info, serve, distill, distill-decoder, recipe, eval.

User errors (TurbokitError) print one line and exit 2; interrupted runs exit 130; both without
a traceback. Cheap checks (paths, sizes, steps/strength) run before the model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from turbokit import __version__
from turbokit.compile import COMPILE_MODES
from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.models import default_model

DEFAULT_MODEL = default_model()  # $TURBOKIT_MODEL, else the shapes-turbo model shipped in the package
log = logging.getLogger("turbokit")


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' → (512, 768); '512' → (512, 512)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if not match:
        raise InvalidRequestError(f"--size must look like 512x512 (WIDTHxHEIGHT), got {text!r}")
    width = int(match[1])
    return width, int(match[2] or width)


def output_paths(output: str | None, seeds: Sequence[int]) -> list[Path]:
    """Where each image goes: `-o file.png` (file-0.png, file-1.png, ... for several images),
    `-o folder/`, or by default turbokit-SEED.png in the current folder, never overwriting."""
    if output is not None and not (output.endswith(("/", os.sep)) or Path(output).is_dir()):
        path = Path(output)
        if path.suffix.lower() != ".png":
            raise InvalidRequestError(f"-o {output}: images are written as .png (which carries their parameters)")
        if not path.parent.is_dir():
            raise InvalidRequestError(f"-o {output}: folder {path.parent} does not exist")
        if len(seeds) == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(len(seeds))]
    folder = Path(output or ".")
    if not folder.is_dir():
        raise InvalidRequestError(f"-o {output}: folder does not exist")
    paths: list[Path] = []
    for seed in seeds:
        path, n = folder / f"turbokit-{seed}.png", 1
        while path.exists() or path in paths:  # never overwrite earlier work
            path, n = folder / f"turbokit-{seed}-{n}.png", n + 1
        paths.append(path)
    return paths


def _add_generation_options(p: argparse.ArgumentParser, default_steps: int) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument(
        "--steps", type=int, default=default_steps, help="denoising steps (default: %(default)s; Turbo models: 1–4)"
    )
    p.add_argument("--seed", type=int, default=None, help="base seed: image i gets SEED+i (default: random)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="how many images (default: %(default)s)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's native size)")
    p.add_argument("-o", "--output", default=None, help="output .png file or folder (default: ./turbokit-SEED.png)")
    p.add_argument("--negative-prompt", default=None, help="what to avoid (needs --guidance-scale > 1)")
    p.add_argument(
        "--guidance-scale", type=float, default=0.0, help="classifier-free guidance; Turbo models use 0 (default)"
    )
    p.add_argument(
        "--sampler", choices=["euler", "euler_a"], default=None, help="default: as the model's scheduler config says"
    )
    _add_model_options(p)


def _add_model_options(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    """Which model, on what, in which precision — shared by every command that samples."""
    p.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help="diffusers folder, .safetensors file or hub id (default: $TURBOKIT_MODEL, else turbokit's own "
        "shapes-turbo model, shipped in the package)",
    )
    if batch_size:
        p.add_argument(
            "--batch-size", type=int, default=None, help="images per forward pass (default: 1 on CPU, 4 on GPU)"
        )
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="default: fastest safe for the device"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--tiny-vae", default=None, metavar="PATH", help="decode with this AutoencoderTiny folder (faster)")
    p.add_argument(
        "--decoder",
        choices=["full", "tiny"],
        default=None,
        help="full: the model's VAE; tiny: --tiny-vae, else the model folder's vae_tiny/ (default: tiny if --tiny-vae)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: the UNet in int8, weights and activations (CPU only). With --compile openvino: NNCF's "
        "post-training quantization, calibrated once per size (needs turbokit[openvino]); otherwise torchao's "
        "int8 linear layers (needs turbokit[int8]; not faster than bf16: docs/performance.md)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        default=None,
        help="compile the UNet, decoder and text encoder with torch.compile (the first image of each size "
        "pays the compilation, again at each launch; kernels are kept in ~/.cache/turbokit); aot: UNet and "
        "decoder compiled ahead of time once per size, later launches load them (warm start; a copy of the "
        "weights per size on disk); openvino: UNet and decoder run by OpenVINO, converted once per size "
        "(CPU; needs turbokit[openvino]; the fastest CPU path); a bare --compile means default",
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="load pickle checkpoints (.ckpt/.pt/.bin): only if trusted"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages, only errors")


def load_pipeline(args: argparse.Namespace):
    """The pipeline that `_add_model_options`' flags describe (model, device, dtype, decoder, int8)."""
    from turbokit.loading import tiny_vae_location
    from turbokit.pipeline import TurboPipeline

    return TurboPipeline.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        tiny_vae=tiny_vae_location(args.model, args.decoder, args.tiny_vae),
        allow_pickle=args.allow_pickle,
        quantize=args.quantize,
        compile=args.compile,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbokit", description="Run Turbo diffusion models in 1–4 steps.")
    parser.add_argument("--version", action="version", version=f"turbokit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image")
    _add_generation_options(gen, default_steps=1)
    img = sub.add_parser("img2img", help="image to image: runs int(steps × strength) steps")
    img.add_argument("image", help="input image (PNG, JPEG, WebP, ...)")
    _add_generation_options(img, default_steps=2)
    img.add_argument("--strength", type=float, default=0.5, help="how much to change, in (0, 1] (default: %(default)s)")
    video = sub.add_parser("video", help="image to image over every frame of a video (fixed seed)")
    video.add_argument("input", help="input video (any format FFmpeg reads)")
    video.add_argument("output", help="output video: .mp4, .mkv or .mov (H.264)")
    video.add_argument("--prompt", required=True, help="the style to apply")
    video.add_argument("--strength", type=float, default=0.5, help="how much to change each frame (default: 0.5)")
    video.add_argument("--steps", type=int, default=2, help="denoising steps before strength (default: %(default)s)")
    video.add_argument("--seed", type=int, default=0, help="one seed for every frame (default: %(default)s)")
    video.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the input's aspect at native size)")
    video.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    _add_model_options(video)
    info = sub.add_parser("info", help="describe a model")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    info.add_argument("--device", default=None)
    info.add_argument("--allow-pickle", action="store_true")
    info.add_argument("-q", "--quiet", action="store_true")
    distill = sub.add_parser(
        "distill",
        help="distil a model into a Turbo model (ADD / LADD)",
        description="Adversarial Diffusion Distillation. Runs on one device, or on many under `accelerate launch`.",
    )
    from turbokit.distill.config import add_arguments

    add_arguments(distill)
    from turbokit.serve import add_arguments as add_serve_arguments

    serve = sub.add_parser("serve", help="HTTP and WebSocket server: OpenAI-style images API, live sessions")
    _add_model_options(serve, batch_size=False)
    add_serve_arguments(serve)
    from turbokit.recipes import recipe, study

    rec = sub.add_parser(
        "recipe",
        help="build turbokit's own Turbo model end to end (data → VAE → text encoder → teacher → ADD student)",
        description=recipe.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rec.add_argument("name", choices=["shapes"], help="the recipe (shapes: the synthetic captioned dataset)")
    recipe.add_arguments(rec)
    from turbokit import decoder_distill

    dd = sub.add_parser(
        "distill-decoder",
        help="train a tiny (TAESD-style) autoencoder for a model's latents: fast decoding with --tiny-vae",
        description=decoder_distill.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    decoder_distill.add_arguments(dd)
    ev = sub.add_parser(
        "eval", help="quality of a shapes model: FID, prompt alignment, held-out pairs", description=study.__doc__
    )
    study.add_arguments(ev)
    return parser


def _distill(args: argparse.Namespace) -> None:
    from turbokit.distill.config import config_from_args
    from turbokit.distill.trainer import train

    path = train(config_from_args(args))
    log.info(f"exported the student to {path}")


def _generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from turbokit import sampling
    from turbokit.images import load_image
    from turbokit.metadata import save_png

    # Everything a user can get wrong is checked before the (slow) model load.
    if args.num_images < 1:
        raise InvalidRequestError("-n must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise InvalidRequestError("--batch-size must be at least 1")
    sampling.trailing_timesteps(args.steps)
    image = None
    run_steps = args.steps
    if args.command == "img2img":
        run_steps = sampling.img2img_steps(args.steps, args.strength)
        image = load_image(args.image)
    width, height = parse_size(args.size) if args.size else (None, None)
    for side in (width, height):
        if side is not None and side % 8:  # every SD/SDXL VAE works at 1/8 scale
            raise InvalidRequestError(f"--size sides must be multiples of 8, got {args.size}")
    base_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    seeds = [base_seed + i for i in range(args.num_images)]
    paths = output_paths(args.output, seeds)
    start = time.perf_counter()
    pipe = load_pipeline(args)
    log.info(f"loaded {pipe.model_name} ({pipe.family_name}) on {pipe.device} in {time.perf_counter() - start:.1f} s")
    batch = args.batch_size or (1 if pipe.device.type == "cpu" else 4)
    show = not args.quiet and (run_steps > 1 or len(seeds) > 1)
    with tqdm(total=run_steps * -(-len(seeds) // batch), unit="step", disable=not show, leave=False) as bar:
        for first in range(0, len(seeds), batch):
            chunk = seeds[first : first + batch]
            start = time.perf_counter()
            result = pipe(
                args.prompt,
                negative_prompt=args.negative_prompt,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                width=width,
                height=height,
                num_images=len(chunk),
                seed=chunk,
                image=image,
                strength=getattr(args, "strength", 0.5),
                sampler=args.sampler,
                callback=lambda _step: bar.update(),
            )
            seconds = (time.perf_counter() - start) / len(chunk)
            for img, params, path in zip(result.images, result.parameters, paths[first:], strict=False):
                save_png(img, path, params)
                if not args.quiet:
                    bar.write(
                        f"wrote {path} (seed {params.seed}, {params.width}x{params.height}, {seconds:.2f} s/image)"
                    )


def _video(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from turbokit import sampling, video

    source, target = Path(args.input), Path(args.output)
    info = video.probe(source)  # checked before the model loads
    video.check_output(target)
    sampling.img2img_steps(args.steps, args.strength)
    size = parse_size(args.size) if args.size else None
    if args.batch_size is not None and args.batch_size < 1:
        raise InvalidRequestError("--batch-size must be at least 1")
    pipe = load_pipeline(args)
    width, height = video.output_size(info, pipe.native_size, size)
    batch = args.batch_size or (1 if pipe.device.type == "cpu" else 4)
    total = min(filter(None, (info.frames, args.max_frames)), default=None)
    writer = video.VideoWriter(target, width, height, info.fps)
    try:
        with tqdm(total=total, unit="frame", disable=args.quiet, desc="video") as bar:
            pending: list = []
            for index, frame in enumerate(video.frames(source)):
                if args.max_frames is not None and index >= args.max_frames:
                    break
                pending.append(frame)
                if len(pending) == batch:
                    _restyle(pipe, pending, args, width, height, writer, bar)
            if pending:
                _restyle(pipe, pending, args, width, height, writer, bar)
    finally:
        writer.close()
    if not args.quiet:
        log.info(f"wrote {target} ({width}x{height}, {float(info.fps):g} fps)")


def _restyle(pipe, pending: list, args: argparse.Namespace, width: int, height: int, writer, bar) -> None:
    """One batch of frames through the model with the same seed each, then out to the writer."""
    result = pipe(
        args.prompt,
        image=list(pending),
        num_images=len(pending),
        seed=[args.seed] * len(pending),
        steps=args.steps,
        strength=args.strength,
        width=width,
        height=height,
    )
    for image in result.images:
        writer.write(image)
    bar.update(len(pending))
    pending.clear()


def _info(args: argparse.Namespace) -> None:
    from turbokit.info import describe
    from turbokit.pipeline import TurboPipeline

    pipe = TurboPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle
    )
    for label, text in describe(pipe).items():
        print(f"{label:<12} {text}")


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    # The libraries' own chatter (loading bars, deprecation notes) is not for our users. Through their environment
    # variables, read when they are first imported: importing them here would cost a warm OpenVINO launch, which
    # runs without diffusers (`turbokit.converted`), seconds. diffusers has no variable for its bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "diffusers" in sys.modules:  # already imported (main() called in-process): set directly
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "compile", None) == "openvino":  # before the heavy imports below: they overlap its work
        from turbokit import openvino_warm

        openvino_warm.start(args.model or default_model(), args.dtype, args.quantize)
    _configure_logging(getattr(args, "quiet", False))
    try:
        if args.command == "info":
            _info(args)
        elif args.command == "distill":
            _distill(args)
        elif args.command == "video":
            _video(args)
        elif args.command == "recipe":
            from turbokit.recipes import recipe

            recipe.run(args)
        elif args.command == "distill-decoder":
            from turbokit import decoder_distill

            decoder_distill.run(args)
        elif args.command == "eval":
            from turbokit.recipes import study

            study.run(args)
        elif args.command == "serve":
            from turbokit.serve import serve

            serve(args)
        else:
            _generate(args)
    except TurbokitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
