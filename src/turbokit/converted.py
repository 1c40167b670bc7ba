"""A warm `--compile openvino` launch without diffusers' model classes (issue 6 §5: warm start ≤ 2 × one image).

Once every model of a diffusers folder has been converted to OpenVINO (`turbokit.openvino_backend`), the
pipeline runs them from the converted copies and needs of each only its config. Importing diffusers' model
classes costs ~5–6 s of a 2-core CPU (their import graph pulls in peft, torch._dynamo, scipy and torchao): more
than half an image. So a warm launch builds stand-ins: modules that hold a component's config and no weights,
whose forward the OpenVINO dispatcher replaces. A stand-in reads its real diffusers component — importing
diffusers then — only when a shape not converted yet is asked for (and the VAE's, when an image must be
encoded). diffusers stays the source of truth: every converted model was traced from its classes, and the
noise schedule is the one its scheduler computed on an earlier launch (cached beside the converted models).
The CLIP tokenizers run from the `tokenizers` JSON inside transformers' own CLIPTokenizer, saved on that launch,
and the text encoders' outputs come back as `ModelOutputs`, so a warm launch imports no transformers either.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from turbokit.families import family_of
from turbokit.loading import LoadedModel, component_sources, load_part
from turbokit.openvino_backend import converted_before
from turbokit.precision import Precision
from turbokit.tokenizer import FastClipTokenizer

log = logging.getLogger(__name__)

Loader = Callable[[], torch.nn.Module]


class Config(dict):
    """A component's config.json with attribute access, as diffusers' configs have."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Converted(torch.nn.Module):
    """A component run only from its converted copies: its config, no weights. `compile_openvino` gives it its
    forward (and, from the model's `extra["loaders"]`, the loader that reads the real component when a new
    shape must be converted)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = Config(config)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # OpenVINO's CPU runtime

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a converted component runs only through compile_openvino's dispatcher")


class ConvertedVae(torch.nn.Module):
    """The VAE of a warm launch: its decoder converted, `post_quant_conv` (a 1×1 convolution, read alone from the
    weights file) eager — `decode` is diffusers' `AutoencoderKL._decode` without tiling, which turbokit never
    turns on. `encode` (image-to-image) loads the real VAE once, with `load_full`."""

    def __init__(
        self, config: dict, decoder: Converted, post_quant_conv: torch.nn.Module | None, load_full: Loader
    ) -> None:
        super().__init__()
        self.config = Config(config)
        self.decoder, self.post_quant_conv = decoder, post_quant_conv
        self.load_full = functools.cache(load_full)

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return SimpleNamespace(sample=self.decoder(z))

    def encode(self, pixels: torch.Tensor) -> Any:
        return self.load_full().encode(pixels)


class Schedule:
    """The scheduler's resolved config and ᾱ, as diffusers computed them on a launch that imported it."""

    def __init__(self, class_name: str, config: dict, alphas_cumprod: list[float]) -> None:
        self.class_name, self.config = class_name, Config(config)
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)


def _schedule_file(cache: Path, root: Path) -> Path:
    digest = hashlib.sha256((root / "scheduler" / "scheduler_config.json").read_bytes()).hexdigest()[:20]
    return cache / "schedules" / f"{digest}.json"


def save_schedule(cache: Path, root: Path, scheduler: Any, alphas_cumprod: torch.Tensor) -> None:
    """Keep what diffusers made of `root`'s scheduler config, for warm launches; keyed on the file's bytes."""
    path = _schedule_file(cache, root)
    if path.is_file():
        return
    entry = {
        "class_name": type(scheduler).__name__,
        "config": dict(scheduler.config),
        "alphas_cumprod": alphas_cumprod.tolist(),
    }
    try:
        text = json.dumps(entry)
    except TypeError:  # a config value JSON cannot hold: no warm launch for this model, never a failed one
        log.debug(f"the schedule of {root} cannot be cached: {entry['config']}")
        return
    _write_atomically(path, text)


def _write_atomically(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a concurrent or killed launch never reads half an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


@functools.cache
def _transformers_version() -> str:
    from importlib.metadata import version  # its package metadata, read without importing it

    return version("transformers")


def _tokenizer_file(cache: Path, folder: Path) -> Path:
    # transformers builds the tokenizer from the files (normalizer, splitting, special tokens): another version may
    # build another one, so its version is part of the key
    digest = hashlib.sha256(f"transformers {_transformers_version()}".encode())
    for path in sorted(folder.iterdir()):  # vocabulary, merges and settings: about 1.5 MB, hashed in milliseconds
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return cache / "tokenizers" / f"{digest.hexdigest()[:20]}.json"


def save_tokenizer(cache: Path, folder: Path, tokenizer: Any) -> None:
    """Keep the `tokenizers` tokenizer inside `tokenizer` (the CLIPTokenizer read from `folder`), for warm launches,
    which then need not import transformers; keyed on the folder's bytes."""
    path = _tokenizer_file(cache, folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if path.is_file() or backend is None:  # None: not a `tokenizers`-backed one; warm launches read the folder
        return
    entry = {
        "tokenizer": backend.to_str(),
        "pad_token_id": int(tokenizer.pad_token_id),
        "model_max_length": int(tokenizer.model_max_length),
    }
    _write_atomically(path, json.dumps(entry))


def _load_tokenizer(cache: Path, folder: Path) -> Any:
    """The cached tokenizer of `folder`, or transformers' CLIPTokenizer read from it when there is none."""
    try:
        entry = json.loads(_tokenizer_file(cache, folder).read_text())
        return FastClipTokenizer(entry["tokenizer"], entry["pad_token_id"], entry["model_max_length"])
    except Exception:  # no entry, or one this version of `tokenizers` cannot read: the folder's own
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder)


def _load_schedule(cache: Path, root: Path) -> Schedule | None:
    try:
        entry = json.loads(_schedule_file(cache, root).read_text())
        return Schedule(entry["class_name"], entry["config"], entry["alphas_cumprod"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config(folder: Path) -> dict | None:
    return _json(folder / "config.json")


def _post_quant_conv(folder: Path, config: dict, dtype: torch.dtype) -> torch.nn.Module | bool | None:
    """The VAE's 1×1 `post_quant_conv` read alone from its safetensors file; None when the VAE has none; False
    when it cannot be read this way (no safetensors file, other key names)."""
    if not config.get("use_post_quant_conv", True):
        return None
    files = sorted(folder.glob("*.safetensors"), key=lambda p: (p.name.count("."), p.name))  # plain before variants
    if not files:
        return False
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        if "post_quant_conv.weight" not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
            return False
        weight, bias = f.get_tensor("post_quant_conv.weight"), f.get_tensor("post_quant_conv.bias")
    conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1])
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    # channels-last as the loaded VAE is on a CPU (`pipeline._place`): the decoder's input layout is part of the
    # converted model's key
    return conv.to(dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def load_converted(
    model: str | Path,
    cache: Path,
    precision: Precision,
    allow_pickle: bool,
    place_vae: Callable[[torch.nn.Module], torch.nn.Module],
) -> LoadedModel | None:
    """`model`'s components as stand-ins for a warm `--compile openvino` launch, or None when
    the launch must load the real ones: not a diffusers folder, a component never converted, no cached schedule,
    or a VAE whose `post_quant_conv` cannot be read alone. `place_vae` readies the real VAE for `encode`."""
    root = Path(model).expanduser()
    index, unet_config = _json(root / "model_index.json"), _config(root / "unet")
    text_config = _config(root / "text_encoder")
    vae_config = _config(root / "vae")
    if index is None or unet_config is None or text_config is None or vae_config is None:
        return None
    family = family_of(unet_config, text_config.get("hidden_size"))
    sources = component_sources(root, family)
    tokenizers = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
    if not all(converted_before(folder, cache, name) for name, folder in sources.items()):
        return None
    if not all((root / t).is_dir() for t in tokenizers):
        return None
    schedule = _load_schedule(cache, root)
    post_quant_conv = _post_quant_conv(root / "vae", vae_config, precision.vae)
    if schedule is None or post_quant_conv is False:
        return None

    def part(sub: str, dtype: torch.dtype) -> Loader:
        return functools.partial(load_part, root, sub, allow_pickle, dtype)

    def decoder() -> torch.nn.Module:
        from turbokit.fused_upsample import fuse_upsamplers

        vae = part("vae", precision.vae)()
        fuse_upsamplers(vae)  # as the converted copies were traced
        return vae.decoder

    loaders: dict[str, Loader] = {
        "unet": part("unet", precision.compute),
        "vae-decoder": decoder,
        "text-encoder-1": part("text_encoder", precision.compute),
    }
    components: dict[str, object] = {
        "unet": Converted(unet_config),
        "vae": ConvertedVae(
            vae_config,
            Converted({}),
            post_quant_conv,
            lambda: place_vae(part("vae", precision.vae)()),
        ),
        "text_encoder": Converted(text_config),
        "tokenizer": _load_tokenizer(cache, root / "tokenizer"),
        "scheduler": schedule,
    }
    if family == "sdxl":
        loaders["text-encoder-2"] = part("text_encoder_2", precision.compute)
        components["text_encoder_2"] = Converted(_config(root / "text_encoder_2") or {})
        components["tokenizer_2"] = _load_tokenizer(cache, root / "tokenizer_2")
    extra = {
        "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
        "folder": root,
        "sources": sources,
        "loaders": loaders,
    }
    log.debug(f"warm launch: {root.name} runs from its converted models")
    return LoadedModel(family, components, root.name, extra)
