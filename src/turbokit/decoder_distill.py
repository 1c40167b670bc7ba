"""`turbokit distill-decoder`: train a TAESD-style tiny autoencoder that decodes a model's latents fast.

TAESD (github.com/madebyollin/taesd) is a small convolutional encoder and decoder, diffusers'
`AutoencoderTiny`, that stands in for a latent-diffusion VAE. Here both halves learn from the model's own
VAE, on the user's images:

- the latents are the VAE encoder's mean in the UNet's latent space (`to_latent_space`: z·sf, or the
  mean/std-normalised form), which is what `TurboPipeline.decode` hands a tiny decoder (whose
  scaling_factor is 1, as TAESD's is);
- the encoder regresses those latents (MSE); the decoder reconstructs the original image from them with
  an L1 loss on every level of a 2× pyramid, on the pixels and on their horizontal and vertical
  differences: a perceptual stand-in that needs no downloaded network and keeps the edges that plain
  L1 blurs (TAESD also trains adversarially; this does not).

The run lives in OUTPUT/training/ (resumable to the step); OUTPUT/ itself becomes the AutoencoderTiny
folder that `--tiny-vae OUTPUT` loads (write it to MODEL/vae_tiny/ for `--decoder tiny`), with a
`report.json` of PSNR and SSIM on held-out images against the full VAE's decode and the originals.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from turbokit.distill.data import ResumableLoader, Source, build_source, preprocess
from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.metrics import psnr, ssim
from turbokit.precision import parse_device
from turbokit.recipes.training import StageRun, finished, set_lr, warmup_cosine

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, AutoencoderTiny

log = logging.getLogger("turbokit")

TAESD_WIDTH, TAESD_DEPTH = 64, 3  # diffusers' AutoencoderTiny defaults: 64 channels, blocks (1, 3, 3, 3)
SMALL_WIDTH, SMALL_DEPTH = 32, 1  # `--small`: 9× fewer weights, for small models and quick runs
PYRAMID_LEVELS = 4
MIN_RESOLUTION = 32  # SSIM's 11-pixel window and a 4-level pyramid need room


@dataclass(frozen=True)
class DecoderRecipe:
    """What a run trains and how; saved beside the run, so a resume continues the same run."""

    steps: int = 10_000
    batch_size: int = 8
    lr: float = 5e-4
    resolution: int = 256
    width: int = TAESD_WIDTH
    """Channels of every level."""
    depth: int = TAESD_DEPTH
    """Blocks per level below the first."""
    heldout: int = 8
    """Images kept out of training for the report."""
    seed: int = 0
    latent_noise: float = 0.0
    """Largest std of the Gaussian noise added to the latents of half of each batch, whose targets are then
    the full VAE's decode of the noisy latents: the full decoder's answer off the encoder's distribution,
    where a 1-step model's samples lie (docs/decoder.md). 0: images only, as TAESD."""

    def check(self) -> None:
        for name, value in (
            ("--steps", self.steps),
            ("--batch-size", self.batch_size),
            ("--heldout", self.heldout),
            ("width", self.width),
            ("depth", self.depth),
        ):
            if value < 1:
                raise InvalidRequestError(f"{name} must be at least 1, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidRequestError(f"--lr must be a positive number, got {self.lr}")
        if self.resolution < MIN_RESOLUTION:
            raise InvalidRequestError(f"--resolution must be at least {MIN_RESOLUTION}, got {self.resolution}")
        if self.seed < 0:
            raise InvalidRequestError(f"--seed must not be negative, got {self.seed}")
        if not (math.isfinite(self.latent_noise) and self.latent_noise >= 0):
            raise InvalidRequestError(f"--latent-noise must be a number ≥ 0, got {self.latent_noise}")


# ---------------------------------------------------------------------------------------------- model


def build_tiny_autoencoder(
    latent_channels: int, scale_factor: int, width: int = TAESD_WIDTH, depth: int = TAESD_DEPTH
) -> AutoencoderTiny:
    """An AutoencoderTiny for a VAE with `latent_channels` that scales images down by `scale_factor` (8 for SD).

    EncoderTiny halves and DecoderTiny doubles the size between levels, so there is one level per 2× plus
    the first: four for SD, as in TAESD. scaling_factor 1: it reads the UNet's latent space as it is."""
    levels = round(math.log2(scale_factor)) + 1
    if 2 ** (levels - 1) != scale_factor:
        raise TurbokitError(f"the VAE scales images by {scale_factor}, not a power of 2: no AutoencoderTiny fits it")
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * levels,
        decoder_block_out_channels=(width,) * levels,
        num_encoder_blocks=(1,) + (depth,) * (levels - 1),
        num_decoder_blocks=(depth,) * (levels - 1) + (1,),
        latent_channels=latent_channels,
        upsampling_scaling_factor=2,
        scaling_factor=1.0,
    )


def vae_scale_factor(config: dict) -> int:
    """How many pixels one latent covers along a side: 2^(levels − 1), as the pipeline computes it."""
    return 2 ** (len(config["block_out_channels"]) - 1)


@torch.no_grad()
def vae_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The UNet-space latents of `pixels` (in [-1, 1]): the encoder's mean, scaled as the pipeline scales it."""
    from turbokit.pipeline import to_latent_space

    return to_latent_space(vae.encode(pixels.to(vae.dtype)).latent_dist.mean.float(), vae.config)


# ---------------------------------------------------------------------------------------------- losses


def _differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def pyramid_l1(x: torch.Tensor, y: torch.Tensor, levels: int = PYRAMID_LEVELS) -> torch.Tensor:
    """Mean over a 2× average-pool pyramid of the L1 distance of the images and of their horizontal and
    vertical differences: matching differences rewards sharp edges and textures, which plain L1 averages away."""
    terms = []
    for level in range(levels):
        if level:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        (x_dx, x_dy), (y_dx, y_dy) = _differences(x), _differences(y)
        terms.append((x - y).abs().mean() + (x_dx - y_dx).abs().mean() + (x_dy - y_dy).abs().mean())
    return torch.stack(terms).mean()


def decoder_loss(
    tiny: AutoencoderTiny,
    pixels: torch.Tensor,
    latents: torch.Tensor,
    decoded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """TAESD's two regressions: encoder(image) → the VAE's latents, decoder(the VAE's latents) → the image;
    `decoded` adds (latents, the full VAE's decode of them) pairs to the decoder's regression."""
    encoder = F.mse_loss(tiny.encode(pixels).latents.float(), latents)
    inputs, targets = latents, pixels
    if decoded is not None:
        inputs, targets = torch.cat([latents, decoded[0]]), torch.cat([pixels, decoded[1]])
    decoder = pyramid_l1(tiny.decode(inputs).sample.float(), targets)
    return {"loss": encoder + decoder, "encoder": encoder, "decoder": decoder}


@torch.no_grad()
def noisy_pairs(
    vae: AutoencoderKL, latents: torch.Tensor, sigma: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents with Gaussian noise of a random std in [0, sigma] each, and the full VAE's decode of them."""
    from turbokit.pipeline import from_latent_space

    scale = torch.rand(len(latents), 1, 1, 1, generator=generator) * sigma
    noisy = latents + scale.to(latents.device) * torch.randn(latents.shape, generator=generator).to(latents.device)
    return noisy, vae.decode(from_latent_space(noisy, vae.config).to(vae.dtype)).sample.float()


# ---------------------------------------------------------------------------------------------- metrics


def _scores(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"psnr_db": round(float(psnr(x, y).mean()), 3), "ssim": round(float(ssim(x, y).mean()), 4)}


@torch.no_grad()
def evaluate(
    tiny: AutoencoderTiny, vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 8, latent_noise: float = 0.0
) -> dict:
    """The tiny decoder against the full VAE's decode and the original images, both decoders fed the same
    latents; the full VAE against the originals (the tiny one's ceiling); the encoder's latent error; how
    long each decoder takes per image; and with `latent_noise`, the two decoders on noisy latents."""
    from turbokit.pipeline import from_latent_space

    device = next(tiny.parameters()).device

    def full_decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(from_latent_space(z, vae.config).to(vae.dtype)).sample

    def tiny_decode(z: torch.Tensor) -> torch.Tensor:
        return tiny.decode(z.to(tiny.dtype)).sample

    originals, full, fast, encoded, latents = [], [], [], [], []
    seconds = {"vae": 0.0, "tiny": 0.0}
    for batch in pixels.split(batch_size):
        batch = batch.to(device)
        z = vae_latents(vae, batch)
        for name, decode, images in (("vae", full_decode, full), ("tiny", tiny_decode, fast)):
            start = time.perf_counter()
            decoded = decode(z).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name] += time.perf_counter() - start
            images.append((decoded / 2 + 0.5).clamp(0, 1).cpu())  # as TurboPipeline.decode maps to [0, 1]
        originals.append((batch.float() / 2 + 0.5).clamp(0, 1).cpu())
        encoded.append(tiny.encode(batch.to(tiny.dtype)).latents.float().cpu())
        latents.append(z.cpu())
    originals, full, fast = torch.cat(originals), torch.cat(full), torch.cat(fast)
    noisy = {}
    if latent_noise > 0:
        generator = torch.Generator().manual_seed(0)
        pairs = [noisy_pairs(vae, z.to(device), latent_noise, generator) for z in latents]
        off = torch.cat([tiny_decode(z).float().cpu() for z, _ in pairs])
        reference = torch.cat([target.cpu() for _, target in pairs])
        noisy = {"tiny_vs_vae_noisy_latents": _scores((off / 2 + 0.5).clamp(0, 1), (reference / 2 + 0.5).clamp(0, 1))}
    return {
        **noisy,
        "tiny_vs_vae": _scores(fast, full),
        "tiny_vs_images": _scores(fast, originals),
        "vae_vs_images": _scores(full, originals),
        "encoder_latent_rmse": round(float((torch.cat(encoded) - torch.cat(latents)).square().mean().sqrt()), 4),
        "decode_ms_per_image": {k: round(1000 * v / len(pixels), 3) for k, v in seconds.items()},
    }


# ---------------------------------------------------------------------------------------------- data


class SubsetSource:
    """Some samples of a source, itself a `Source`: the training images, or the held-out ones."""

    sample_size = None

    def __init__(self, source: Source, indices: range, name: str) -> None:
        self.source, self.indices, self.name = source, indices, name
        self.skipped = source.skipped

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Image.Image | torch.Tensor, str]:
        return self.source.load(self.indices[index])


def split_heldout(source: Source, heldout: int) -> tuple[SubsetSource, SubsetSource]:
    """(training, held-out): the last `heldout` samples are never trained on."""
    if len(source) <= heldout:
        raise TurbokitError(
            f"{source.name} has {len(source)} images: training needs more than the {heldout} held out for the "
            "report (add images, or lower --heldout)"
        )
    cut = len(source) - heldout
    return (
        SubsetSource(source, range(cut), f"{source.name} (training)"),
        SubsetSource(source, range(cut, len(source)), f"{source.name} (held out)"),
    )


def load_pixels(source: Source, resolution: int) -> torch.Tensor:
    """Every readable sample of `source` as a centre crop, (N, 3, R, R) in [-1, 1]; unreadable ones are skipped."""
    images = []
    for index in range(len(source)):
        try:
            image, _ = source.load(index)
        except TurbokitError as err:
            log.warning(f"skipping an unreadable held-out image: {err}")
            continue
        images.append(preprocess(image, resolution)[0])
    if not images:
        raise TurbokitError(f"none of the {len(source)} images of {source.name} is readable")
    return torch.stack(images)


def _loader_at(source: Source, recipe: DecoderRecipe, step: int, num_workers: int) -> ResumableLoader:
    """The training batches from batch `step` on: the stream's position after `step` batches (unreadable
    samples change which image loads, never the position)."""
    loader = ResumableLoader(
        source,
        recipe.batch_size,
        recipe.resolution,
        seed=recipe.seed,
        random_crop=True,
        random_flip=True,
        num_workers=num_workers,
    )
    epoch, index = divmod(step * recipe.batch_size, len(source))
    loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "index": index})
    return loader


# ---------------------------------------------------------------------------------------------- training


def _check_output(output: Path, settings: dict) -> None:
    """OUTPUT must be new, empty, or this very run (to resume); anything else is someone's files."""
    saved = output / "training" / "settings.json"
    if saved.is_file():
        # a run saved before a setting existed ran with its default
        previous = asdict(DecoderRecipe()) | json.loads(saved.read_text(encoding="utf-8"))
        changed = [f"{k} {previous.get(k)!r} → {v!r}" for k, v in settings.items() if previous.get(k) != v]
        if changed:
            raise TurbokitError(
                f"{output} holds a decoder run with other settings ({'; '.join(changed)}): "
                "rerun with its settings to resume it, or choose another --output-dir"
            )
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise TurbokitError(f"--output-dir {output} exists and is not an empty folder: choose a new one")


def train_decoder(
    model: str | Path,
    data: str | Path,
    output_dir: str | Path,
    recipe: DecoderRecipe | None = None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    allow_pickle: bool = False,
    progress: bool = True,
    num_workers: int = 2,
) -> dict:
    """Train (or resume, or find finished) a tiny autoencoder for `model`'s VAE on `data`; export it to
    `output_dir` and return the report also written to `output_dir/report.json`.

    `dtype` "bf16" trains under bf16 autocast ("auto": on CUDA only); the VAE always runs in fp32."""
    from turbokit.loading import check_model_source, load_vae, vae_config  # diffusers: not at the CLI's start

    recipe = recipe or DecoderRecipe()
    recipe.check()
    if dtype not in ("auto", "fp32", "bf16"):
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, fp32 or bf16")
    check_model_source(model)
    source = build_source(data, captions=False)
    if source.sample_size is not None:
        raise TurbokitError(f"{data} holds latents: the decoder trains on images (a folder, .jsonl, .tar or shapes:)")
    train, heldout = split_heldout(source, recipe.heldout)
    output = Path(output_dir)
    settings = {"model": str(model), "data": str(data), **asdict(recipe)}
    _check_output(output, settings)
    config = vae_config(model)  # known before loading for diffusers folders; single files are all 8×
    factor = vae_scale_factor(config) if config else 8
    if recipe.resolution % factor:
        raise InvalidRequestError(
            f"--resolution must be a multiple of {factor} (the VAE's scale), got {recipe.resolution}"
        )
    target = parse_device(device)
    autocast = dtype == "bf16" or (dtype == "auto" and target.type == "cuda")
    if finished(output / "training") and (output / "report.json").is_file():
        log.info(f"{output} already holds this finished run (delete it to train again)")
        return json.loads((output / "report.json").read_text(encoding="utf-8"))

    vae = load_vae(model, allow_pickle=allow_pickle, dtype=torch.float32).to(target).eval().requires_grad_(False)
    heldout_pixels = load_pixels(heldout, recipe.resolution)  # a bad held-out set fails now, not after training
    torch.manual_seed(recipe.seed)
    tiny = build_tiny_autoencoder(vae.config.latent_channels, vae_scale_factor(vae.config), recipe.width, recipe.depth)
    tiny = tiny.to(target)
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=recipe.lr, weight_decay=0.0)
    run = StageRun(output / "training", {"tiny": tiny}, optimizer, recipe.steps, label="distill-decoder")
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    start = run.resume()
    log.info(f"training a tiny decoder for {model} on {len(train)} images of {source.name}, from step {start}")
    loader = _loader_at(train, recipe, start, num_workers)
    tiny.train()
    try:
        for step in run.steps(log_every=max(1, min(50, recipe.steps // 20)), progress=progress):
            set_lr(optimizer, recipe.lr, warmup_cosine(step, recipe.steps, min(100, recipe.steps // 10)))
            pixels = next(loader).pixels.to(target)
            latents = vae_latents(vae, pixels)
            decoded = None
            if recipe.latent_noise > 0:  # seeded by the step: a resumed run draws the same noise
                generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
                half = latents[len(latents) // 2 :]
                decoded = noisy_pairs(vae, half, recipe.latent_noise, generator)
            with torch.autocast(target.type, torch.bfloat16, enabled=autocast):
                losses = decoder_loss(tiny, pixels, latents, decoded)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
            optimizer.step()
            run.log(**{k: v.item() for k, v in losses.items()})
    finally:
        loader.close()
    tiny.eval()

    report = {
        "model": str(model),
        "data": source.name,
        "recipe": asdict(recipe),
        "latent_channels": vae.config.latent_channels,
        "scale_factor": vae_scale_factor(vae.config),
        "parameters": {"tiny_decoder": _count(tiny.decoder), "vae_decoder": _count(vae.decoder)},
        "heldout_images": len(heldout_pixels),
        "loss": {"first": run.history[0]["loss"], "last": run.latest.get("loss", run.history[-1]["loss"])},
        **evaluate(tiny, vae, heldout_pixels, recipe.batch_size, recipe.latent_noise),
    }
    tiny.save_pretrained(output)
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    run.finish({"steps": recipe.steps, "tiny_vs_vae": report["tiny_vs_vae"]})
    return report


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DecoderRecipe()
    p.add_argument("model", help="diffusers folder, .safetensors file or hub id whose VAE to match")
    p.add_argument(
        "--data", required=True, help="images: a folder (captions not needed), .jsonl, .tar shards or shapes:URI"
    )
    p.add_argument("--output-dir", required=True, help="where the AutoencoderTiny, report.json and the run go")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="training crop side (default: %(default)s)")
    p.add_argument(
        "--small",
        action="store_true",
        help=f"{SMALL_WIDTH} channels, {SMALL_DEPTH} block a level (default: TAESD's {TAESD_WIDTH} and {TAESD_DEPTH})",
    )
    p.add_argument("--heldout", type=int, default=d.heldout, help="images kept for the report (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="initial weights and batch order (default: %(default)s)")
    p.add_argument(
        "--latent-noise",
        type=float,
        default=d.latent_noise,
        help="also learn the full VAE's decode of latents with noise up to this std (half of each batch): for "
        "models whose samples are off the encoder's distribution, e.g. 1-step students (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="bf16 autocast (default: on CUDA only)"
    )
    p.add_argument("--allow-pickle", action="store_true", help="load pickle checkpoints: only if trusted")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors")


def run(args: argparse.Namespace) -> None:
    recipe = DecoderRecipe(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        resolution=args.resolution,
        width=SMALL_WIDTH if args.small else TAESD_WIDTH,
        depth=SMALL_DEPTH if args.small else TAESD_DEPTH,
        heldout=args.heldout,
        seed=args.seed,
        latent_noise=args.latent_noise,
    )
    report = train_decoder(
        args.model,
        args.data,
        args.output_dir,
        recipe,
        device=args.device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    vs_vae = report["tiny_vs_vae"]
    log.info(
        f"wrote {args.output_dir}: PSNR {vs_vae['psnr_db']:.1f} dB and SSIM {vs_vae['ssim']:.3f} against the "
        f"full VAE on {report['heldout_images']} held-out images; use it with --tiny-vae {args.output_dir}"
    )
