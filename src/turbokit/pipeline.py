"""TurboPipeline: text-to-image and image-to-image in 1–N steps over diffusers model classes.

One pipeline for every family: the SD/SDXL differences live in `turbokit.families`, the sampling
maths in `turbokit.sampling`. Usage:

    pipe = TurboPipeline.from_pretrained("path/to/sd-turbo")
    image = pipe("a cat in a hat", seed=1).images[0]
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from turbokit import converted, sampling
from turbokit.aot import compile_ahead
from turbokit.compile import cache_root, check_compile, compile_module, use_disk_cache
from turbokit.errors import InvalidRequestError
from turbokit.families import Conditioning, Family, build_family
from turbokit.images import fit_size, pil_to_tensor, resize, tensor_to_pil
from turbokit.loading import LoadedModel, load_model, load_tiny_vae, vae_config
from turbokit.metadata import GenerationParameters
from turbokit.models import default_model
from turbokit.openvino_backend import compile_openvino, converted_before
from turbokit.openvino_warm import LaunchRecord, launch_key
from turbokit.precision import Precision, choose_precision, parse_device
from turbokit.prompt_cache import PromptCache
from turbokit.quantize import check_quantize, quantize_unet

if TYPE_CHECKING:  # diffusers is imported when a model is loaded: a warm OpenVINO launch runs without it
    from diffusers import AutoencoderKL, AutoencoderTiny

log = logging.getLogger("turbokit")

# What an int8 UNet is calibrated on: everyday subjects, and the shipped shapes-turbo model's vocabulary.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red circle on a blue background",
    "a portrait of an old man with a beard, studio lighting",
    "a small green triangle above a yellow square on a white background",
    "a cozy living room with a fireplace, wide angle",
    "a bowl of fruit on a wooden table, oil painting",
    "a city street at night in the rain, neon signs",
    "a mountain lake at sunrise, landscape photograph",
)
CALIBRATION_STEPS = (1, 2, 4)

SAMPLERS = {"euler": "Euler", "euler_a": "Euler a"}  # turbokit name → AUTOMATIC1111's name
MAX_SIDE = 4096
MAX_SEED = 2**63 - 1


@dataclass
class GenerationResult:
    """The images of one call and, for each, the parameters that reproduce it."""

    pixels: torch.Tensor | None
    """(N, 3, H, W) float images in [0, 1], before 8-bit rounding (None when called with decode=False)."""
    parameters: list[GenerationParameters]
    latents: torch.Tensor
    """(N, C, H/8, W/8) final latents in the UNet's (scaled) latent space, on the pipeline's device."""

    @functools.cached_property
    def images(self) -> list[Image.Image]:
        if self.pixels is None:
            raise ValueError("this result was made with decode=False: it has latents only")
        return tensor_to_pil(self.pixels)

    @property
    def seeds(self) -> list[int]:
        return [p.seed for p in self.parameters]


def _latent_stats(config: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        return None
    view = (1, len(mean), 1, 1)
    return like.new_tensor(mean).view(view), like.new_tensor(std).view(view)


def to_latent_space(z: torch.Tensor, vae_config: dict) -> torch.Tensor:
    """VAE latents → the UNet's (scaled) latent space: z·sf, or (z − μ)·sf/σ for VAEs whose config gives
    `latents_mean`/`latents_std`. A tiny decoder (`turbokit distill-decoder`) is trained on this space too."""
    stats, sf = _latent_stats(vae_config, z), vae_config["scaling_factor"]
    return z * sf if stats is None else (z - stats[0]) * sf / stats[1]


def from_latent_space(x: torch.Tensor, vae_config: dict) -> torch.Tensor:
    """The inverse of `to_latent_space`: what the full VAE's decoder takes."""
    stats, sf = _latent_stats(vae_config, x), vae_config["scaling_factor"]
    return x / sf if stats is None else x * stats[1] / sf + stats[0]


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, conv: bool = False) -> torch.nn.Module:
    """Move a model to its device and dtype, in inference mode; convolutional models go channels-last,
    the layout oneDNN and cuDNN convolve fastest (measured: 30% off the SD VAE decode on a CPU).
    Their upsamplers run as transposed convolutions (`turbokit.fused_upsample`: exact, less work).
    A module without weights (`load_folder(empty_unet=True)`) only takes the dtype; a converted stand-in
    (`turbokit.converted`) is left as it is."""
    if isinstance(module, converted.Converted | converted.ConvertedVae):
        return module
    if conv:
        from turbokit.fused_upsample import fuse_upsamplers  # imports diffusers

        fuse_upsamplers(module)
    if next(module.parameters()).is_meta:
        return module.to(dtype).eval().requires_grad_(False)
    module = module.to(device)
    if module.dtype != dtype:
        module = module.to(dtype)
    if conv and device.type in ("cpu", "cuda"):
        module = module.to(memory_format=torch.channels_last)
    return module.eval().requires_grad_(False)


class TurboPipeline:
    """A Turbo (or any SD/SDXL) model ready to sample: components on one device, in one precision."""

    def __init__(
        self,
        model: LoadedModel,
        device: torch.device,
        precision: Precision,
        tiny_vae: AutoencoderTiny | None = None,
        quantize: str | None = None,
        compile: str | None = None,
        launch: str | None = None,
    ) -> None:
        """`launch`: with compile="openvino", the key (`openvino_warm.launch_key`) under which the OpenVINO
        models compiled are recorded, for the next launch with that key to prefetch."""
        c = model.components
        self.model_name = model.name
        self.family_name = model.family
        self.device, self.precision = device, precision
        check_quantize(quantize, device, compile)
        self.quantize = quantize
        self.unet = _place(c["unet"], device, precision.compute, conv=True)
        if quantize is not None and compile != "openvino":  # OpenVINO's int8 is NNCF's, made per shape
            start = time.perf_counter()
            layers = quantize_unet(self.unet)
            seconds = time.perf_counter() - start
            log.info(f"{quantize}: quantized {len(layers)} linear layers of the UNet in {seconds:.1f} s")
        self.vae: AutoencoderKL = _place(c["vae"], device, precision.vae, conv=True)
        self.tiny_vae = None if tiny_vae is None else _place(tiny_vae, device, precision.vae, conv=True)
        self.text_encoders = [
            _place(c[k], device, precision.compute) for k in ("text_encoder", "text_encoder_2") if k in c
        ]
        self.compile_mode = compile
        check_compile(compile, device, quantize)
        if compile is not None:
            if compile != "openvino":  # inductor's caches (importing inductor takes a warm OpenVINO launch ~1 s)
                use_disk_cache()
            # compiled lazily, at the first call of each (and again per new shape)
            decoders = {"vae-decoder": self.vae.decoder}
            if self.tiny_vae is not None:
                decoders["tiny-decoder"] = self.tiny_vae.decoder
            if compile == "aot":  # the text encoders stay eager: prompts are cached, they cost little
                for name, module in {"unet": self.unet, **decoders}.items():
                    compile_ahead(module, cache_root() / "aot", name)
            elif compile == "openvino":
                cache = cache_root() / "openvino"
                record = None if launch is None else LaunchRecord(cache, launch)
                # a model from a folder is known to the cache by its files (a warm launch need not read weights)
                sources, loaders = model.extra.get("sources", {}), model.extra.get("loaders", {})
                compile_openvino(
                    self.unet,
                    cache,
                    "unet",
                    precision.compute,
                    sources.get("unet"),
                    loaders.get("unet"),
                    quantize,
                    self._calibrate_unet,
                    record,
                )
                for name, module in decoders.items():
                    source, load = sources.get(name), loaders.get(name)
                    compile_openvino(module, cache, name, precision.vae, source, load, record=record)
                for i, encoder in enumerate(self.text_encoders):
                    name = f"text-encoder-{i + 1}"
                    source, load = sources.get(name), loaders.get(name)
                    compile_openvino(encoder, cache, name, precision.compute, source, load, record=record)
            else:
                for module in (self.unet, *decoders.values(), *self.text_encoders):
                    compile_module(module, device, compile)
        self.scheduler = c["scheduler"]
        zeros = bool(model.extra.get("force_zeros_for_empty_prompt", True))
        self.family: Family = build_family(model.family, c, zeros)  # c's encoders are the placed ones
        self.encode = PromptCache(self._encode_new_prompts)
        self.encode_tokenizer = c["tokenizer"]
        if isinstance(self.scheduler, converted.Schedule):  # a warm OpenVINO launch: diffusers' ᾱ, cached
            self.alphas_cumprod, scheduler_name = self.scheduler.alphas_cumprod, self.scheduler.class_name
        else:
            from diffusers.schedulers import EulerDiscreteScheduler

            # diffusers computes ᾱ from the scheduler config (beta schedule, zero-SNR rescale); reuse it.
            self.alphas_cumprod = EulerDiscreteScheduler.from_config(self.scheduler.config).alphas_cumprod
            scheduler_name = type(self.scheduler).__name__
            if compile == "openvino" and "folder" in model.extra:  # for the next, warm, launch
                cache, folder = cache_root() / "openvino", model.extra["folder"]
                converted.save_schedule(cache, folder, self.scheduler, self.alphas_cumprod)
                for sub in ("tokenizer", "tokenizer_2"):
                    if sub in c and (folder / sub).is_dir():
                        converted.save_tokenizer(cache, folder / sub, c[sub])
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        self.default_sampler = "euler_a" if "Ancestral" in scheduler_name else "euler"
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_size = self.unet.config.sample_size * self.vae_scale_factor

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        tiny_vae: str | Path | None = None,
        allow_pickle: bool = False,
        quantize: str | None = None,
        compile: str | None = None,
    ) -> TurboPipeline:
        """Load a diffusers folder, a single-file checkpoint (.safetensors) or a hub id; None: the default
        model (`$TURBOKIT_MODEL`, else the shapes-turbo model shipped in the package).

        `dtype` is "fp32", "fp16", "bf16" or None for the device's best safe choice;
        `tiny_vae` is an AutoencoderTiny folder used to decode instead of the full VAE;
        `quantize="int8"` runs the UNet's linear layers in int8 on the CPU (`turbokit.quantize`);
        `compile` ("default", "max-autotune", "reduce-overhead") compiles the UNet, decoder and text
        encoders with torch.compile, its caches on disk (`turbokit.compile`); "aot" runs the UNet and
        decoder as AOTInductor packages built once per shape and reloaded by later launches (`turbokit.aot`);
        "openvino" runs them with OpenVINO's CPU runtime, converted once per shape (`turbokit.openvino_backend`)."""
        model = default_model() if model is None else model
        device = device if isinstance(device, torch.device) else parse_device(device)
        check_quantize(quantize, device, compile)  # before the slow load
        check_compile(compile, device, quantize)
        force_upcast = bool(vae_config(model).get("force_upcast", True))
        precision = choose_precision(device, dtype, force_upcast)
        launch = launch_key(model, dtype, quantize) if compile == "openvino" else None
        if compile == "openvino" and tiny_vae is None:  # a warm launch runs its converted models without diffusers
            place_vae = functools.partial(_place, device=device, dtype=precision.vae, conv=True)
            warm = converted.load_converted(model, cache_root() / "openvino", precision, allow_pickle, place_vae)
            if warm is not None:
                return cls(warm, device, precision, None, quantize, compile, launch)
        # a UNet that OpenVINO runs from a converted copy need not be read at all (warm start)
        unet_folder = Path(model).expanduser() / "unet"
        empty = compile == "openvino" and converted_before(unet_folder, cache_root() / "openvino", "unet")
        loaded = load_model(
            model, allow_pickle=allow_pickle, dtype=precision.compute, vae_dtype=precision.vae, empty_unet=empty
        )
        decoder = None if tiny_vae is None else load_tiny_vae(tiny_vae, precision.vae)
        return cls(loaded, device, precision, decoder, quantize, compile, launch)

    # ------------------------------------------------------------------ sampling

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | None = None,
        steps: int = 1,
        guidance_scale: float = 0.0,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        seed: int | list[int] | None = None,
        image: Image.Image | list[Image.Image] | None = None,
        strength: float = 0.5,
        sampler: str | None = None,
        callback: Callable[[int], None] | None = None,
        decode: bool = True,
    ) -> GenerationResult:
        """Text-to-image, or image-to-image when `image` is given (then `int(steps × strength)` steps run;
        one image for the whole batch, or one per output image, e.g. the frames of a video).

        A prompt list gives `num_images` images per prompt. `seed` is a base seed (image i gets
        seed + i), one seed per image, or None for a random base; the same seed always gives the
        same image, whatever else is in the batch. `callback(i)` runs after each step; with
        `decode=False` only the latents are returned (e.g. to cache a teacher's samples)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_images < 1:
            raise InvalidRequestError("nothing to generate: give at least one prompt and num_images ≥ 1")
        prompts = [p for p in prompts for _ in range(num_images)]
        seeds = self._seeds(seed, len(prompts))
        sampler = self._sampler(sampler)
        if image is not None:
            images = [image] if isinstance(image, Image.Image) else list(image)
            width, height = self._img2img_size(images[0], width, height)
        width, height = self._check_size(
            self.native_size if width is None else width, self.native_size if height is None else height
        )

        timesteps = sampling.trailing_timesteps(steps, self.scheduler.config.num_train_timesteps)
        sigmas = sampling.sigmas_at(timesteps, self.alphas_cumprod)
        if image is not None:
            first = steps - sampling.img2img_steps(steps, strength)
            timesteps, sigmas = timesteps[first:], sigmas[first:]
        timesteps, sigmas = timesteps.to(self.device), sigmas.to(self.device)

        cfg = guidance_scale > 1
        if negative_prompt and not cfg:
            log.warning("the negative prompt is ignored: it needs guidance_scale > 1 (Turbo models use 0)")
        cond = self.encode(prompts)
        if cfg:
            negative = (
                cond.zeros_like()
                if negative_prompt is None and self.family.zero_negative
                else self.encode([negative_prompt or ""] * len(prompts))
            )
            cond = Conditioning.cat([negative, cond])
        unet_kwargs = self.family.unet_kwargs(cond, height, width)

        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = (
            len(prompts),
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if image is None:
            x = sampling.noise(shape, generators, self.device, torch.float32) * sigmas[0]
        else:
            latents = self._encode_images(images, width, height, generators)
            x = latents + sampling.noise(shape, generators, self.device, torch.float32) * sigmas[0]

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            x_in = sampling.scale_input(x, sigmas[i]).to(self.precision.compute)
            if cfg:
                x_in = torch.cat([x_in, x_in])
            out = self.unet(x_in, timesteps[i], encoder_hidden_states=cond.embeds, return_dict=False, **unet_kwargs)[0]
            if cfg:
                uncond, text = out.chunk(2)
                out = uncond + guidance_scale * (text - uncond)
            return sampling.to_denoised(x, out.float(), sigmas[i], self.prediction_type)

        ancestral = generators if sampler == "euler_a" else None
        x = sampling.sample_euler(denoise, x, sigmas, ancestral, callback)
        pixels = self.decode(x).cpu() if decode else None
        params = [
            GenerationParameters(
                prompt=p,
                negative_prompt=negative_prompt or "",
                steps=steps,
                seed=s,
                width=width,
                height=height,
                model=self.model_name,
                guidance_scale=guidance_scale,
                sampler=SAMPLERS[sampler],
                strength=strength if image is not None else None,
            )
            for p, s in zip(prompts, seeds, strict=True)
        ]
        return GenerationResult(pixels, params, x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [0, 1], through the tiny decoder when one is loaded."""
        if self.tiny_vae is not None:
            out = self.tiny_vae.decode(latents.to(self.precision.vae) / self.tiny_vae.config.scaling_factor).sample
        else:
            out = self.vae.decode(from_latent_space(latents, self.vae.config).to(self.precision.vae)).sample
        out = out.float()
        if not torch.isfinite(out).all():
            log.warning("the decoder produced NaN/inf values (numeric overflow): try --dtype fp32")
        return (out / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ helpers

    def _calibrate_unet(self, args: tuple, kwargs: dict) -> None:
        """Sample the calibration prompts at 1, 2 and 4 steps with the UNet call's shapes (batch and latent
        size), so that an int8 UNet (`--quantize int8 --compile openvino`) sees the inputs it will meet."""
        x = args[0]
        batch, height, width = x.shape[0], x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        prompts = CALIBRATION_PROMPTS
        for steps in CALIBRATION_STEPS:
            for start in range(0, len(prompts), batch):
                group = [prompts[(start + j) % len(prompts)] for j in range(batch)]
                self(group, steps=steps, width=width, height=height, seed=start, decode=False)

    def _encode_images(
        self, images: list[Image.Image], width: int, height: int, generators: list[torch.Generator]
    ) -> torch.Tensor:
        if len(images) not in (1, len(generators)):
            raise InvalidRequestError(f"{len(images)} input images for {len(generators)} outputs")
        pixels = pil_to_tensor([resize(image, width, height) for image in images]).to(self.device, self.precision.vae)
        dist = self.vae.encode(pixels).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        if len(images) == 1:
            mean, std = mean.expand(len(generators), -1, -1, -1), std.expand(len(generators), -1, -1, -1)
        # A sample (not the mean) of the posterior per image, from that image's own generator, as diffusers does.
        z = mean + std * sampling.noise(mean.shape, generators, self.device, torch.float32)
        return to_latent_space(z, self.vae.config)

    def _encode_new_prompts(self, prompts: list[str]) -> Conditioning:
        """What the prompt cache calls on a miss: repeated prompts pay neither the check nor the encoder."""
        self._warn_if_truncated(prompts)
        return self.family.encode(prompts)

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        """CLIP reads 77 tokens; say which words of a longer prompt the model never sees."""
        tokenizer = self.encode_tokenizer
        for prompt in dict.fromkeys(prompts):
            ids = tokenizer(prompt).input_ids
            if len(ids) > tokenizer.model_max_length:
                dropped = tokenizer.decode(ids[tokenizer.model_max_length - 1 : -1])
                log.warning(f"the prompt is over CLIP's {tokenizer.model_max_length} tokens; ignored: {dropped!r}")

    def _seeds(self, seed: int | list[int] | None, n: int) -> list[int]:
        if seed is None:
            base = random.randrange(2**32)
            return [base + i for i in range(n)]
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        if len(seeds) != n:
            raise InvalidRequestError(f"{len(seeds)} seeds given for {n} images")
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise InvalidRequestError(f"seeds must be between 0 and {MAX_SEED}")
        return seeds

    def _sampler(self, sampler: str | None) -> str:
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise InvalidRequestError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        return sampler

    def _img2img_size(self, image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
        if width and height:
            return width, height
        fitted = fit_size(image.width, image.height, self.native_size**2, self.vae_scale_factor)
        return width or fitted[0], height or fitted[1]

    def _check_size(self, width: int, height: int) -> tuple[int, int]:
        m = self.vae_scale_factor
        # The smallest latent the UNet's downsampling leaves at least one pixel of.
        min_side = m * 2 ** (len(self.unet.config.down_block_types) - 1)
        for name, side in (("width", width), ("height", height)):
            if side % m or not min_side <= side <= MAX_SIDE:
                raise InvalidRequestError(
                    f"{name} must be a multiple of {m} between {min_side} and {MAX_SIDE}, got {side}"
                )
        n = self.native_size
        if max(width, height) > 2 * n or min(width, height) < n // 2:
            log.warning(f"{width}x{height} is far from this model's native {n}x{n}: expect lower quality")
        return width, height
