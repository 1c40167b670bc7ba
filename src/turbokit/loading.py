"""Finding and loading a model: a diffusers folder, a single-file checkpoint, or a hub id.

Every path ends in the same dict of diffusers/transformers components (`unet`, `vae`,
`text_encoder`, `tokenizer`, `scheduler`, and for SDXL `text_encoder_2`, `tokenizer_2`), so the
pipeline never knows where a model came from. diffusers and transformers are imported when a model is
loaded, not with this module: their import graph takes seconds, which a warm `--compile openvino` launch
(`turbokit.converted`) does without.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from turbokit.errors import InvalidRequestError, ModelNotFoundError, TurbokitError
from turbokit.families import family_of
from turbokit.tokenizer import PAD_OPENAI, PAD_OPENCLIP, clip_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, AutoencoderTiny
    from diffusers.schedulers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    from transformers import CLIPTokenizer

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TINY_VAE_SUBFOLDER = "vae_tiny"
"""Where `--decoder tiny` looks for an AutoencoderTiny inside a model folder (diffusers ignores extra subfolders)."""
PICKLE_REFUSAL = (
    "pickle-based weights can run arbitrary code when loaded; convert them to .safetensors, "
    "or pass --allow-pickle (allow_pickle=True) if you trust the source"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A model's components, its family ("sd1", "sd2" or "sdxl") and the name it was loaded by."""

    family: str
    components: dict[str, object]
    name: str
    extra: dict[str, object] = field(default_factory=dict)


def _weights_variant(folder: Path, allow_pickle: bool) -> tuple[bool, str | None]:
    """(use_safetensors, variant) for a component folder; pickle-only folders need allow_pickle."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    safetensors = [n for n in names if n.endswith((".safetensors", ".safetensors.index.json"))]
    if safetensors:
        plain = [n for n in safetensors if n.count(".") <= (2 if n.endswith(".json") else 1)]
        if plain:
            return True, None
        return True, safetensors[0].split(".")[1]  # e.g. "fp16" from model.fp16.safetensors
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        if not allow_pickle:
            raise TurbokitError(f"{folder} holds only pickle weights: {PICKLE_REFUSAL}")
        return False, None
    raise ModelNotFoundError(f"no weights found in {folder}")


def _classes() -> dict[str, type]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # diffusers' own bars (a sharded checkpoint's "Loading checkpoint shards") have no variable of their own:
    # honour the hub's, which the CLI sets (it cannot import diffusers early to call this; turbokit.converted)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in {"1", "ON", "YES", "TRUE"}:
        diffusers_logging.disable_progress_bar()
    return {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }


def load_part(root: Path, sub: str, allow_pickle: bool, dtype: torch.dtype) -> torch.nn.Module:
    """One model component (`unet`, `vae`, `text_encoder` or `text_encoder_2`) of a diffusers folder."""
    cls = _classes()[sub]
    use_safetensors, variant = _weights_variant(root / sub, allow_pickle)
    return cls.from_pretrained(root, subfolder=sub, use_safetensors=use_safetensors, variant=variant, torch_dtype=dtype)


def _tokenizer(root: Path, sub: str, pad: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    # Folders converted from single files often lack tokenizer files; the offline one is identical.
    if (root / sub).is_dir():
        return CLIPTokenizer.from_pretrained(root, subfolder=sub)
    return clip_tokenizer(pad)


def _scheduler(root: Path) -> EulerDiscreteScheduler | EulerAncestralDiscreteScheduler:
    from diffusers.schedulers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    cls = (
        EulerAncestralDiscreteScheduler
        if config.get("_class_name", "").startswith("EulerAncestral")
        else EulerDiscreteScheduler
    )
    return cls.from_config(config)


def component_sources(root: Path, family: str) -> dict[str, Path]:
    """The component folder of each model a pipeline may run converted, by the name the OpenVINO cache knows it
    by (`--compile openvino`): a folder's files, not its tensors, identify the converted copy."""
    sources = {"unet": root / "unet", "vae-decoder": root / "vae", "text-encoder-1": root / "text_encoder"}
    if family == "sdxl":
        sources["text-encoder-2"] = root / "text_encoder_2"
    return sources


def vae_config(model: str | Path) -> dict:
    """The VAE's config.json of a diffusers folder ({} for other sources: they use the Turbo config)."""
    path = Path(model) / "vae" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_folder(
    root: Path, allow_pickle: bool, dtype: torch.dtype, vae_dtype: torch.dtype, empty_unet: bool = False
) -> LoadedModel:
    """A diffusers model folder of the SD 1.x/2.x or SDXL family.

    `extra["sources"]` maps the names the OpenVINO cache knows the converted models by to their component
    folders, `extra["loaders"]` to functions that read their weights again on demand; with `empty_unet` the
    UNet is built from its config with no weights (on the meta device) — for engines that run it from a
    converted copy (`--compile openvino`), so that a warm launch does not read weights it will not use."""
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    if not (root / "unet").is_dir():
        raise ModelNotFoundError(f"{root} has no unet/ folder: only SD 1.x/2.x and SDXL UNet models are supported")
    load_unet = functools.partial(load_part, root, "unet", allow_pickle, dtype)
    if empty_unet:
        import accelerate

        unet_class = _classes()["unet"]
        with accelerate.init_empty_weights():
            unet = unet_class.from_config(unet_class.load_config(root, subfolder="unet"))
    else:
        unet = load_unet()
    text_encoder = load_part(root, "text_encoder", allow_pickle, dtype)
    family = family_of(dict(unet.config), text_encoder.config.hidden_size)
    components: dict[str, object] = {
        "unet": unet,
        "vae": load_part(root, "vae", allow_pickle, vae_dtype),
        "text_encoder": text_encoder,
        "tokenizer": _tokenizer(root, "tokenizer", PAD_OPENAI if family != "sd2" else PAD_OPENCLIP),
        "scheduler": _scheduler(root),
    }
    if family == "sdxl":
        components["text_encoder_2"] = load_part(root, "text_encoder_2", allow_pickle, dtype)
        components["tokenizer_2"] = _tokenizer(root, "tokenizer_2", PAD_OPENCLIP)
    extra = {
        "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
        "folder": root,
        "sources": component_sources(root, family),
        "loaders": {"unet": load_unet},
    }
    return LoadedModel(family, components, root.name, extra)


def _download(repo_id: str, allow_pickle: bool) -> Path:
    """Fetch a hub model through diffusers' own downloader (cache first); offline, one clear error."""
    from diffusers import DiffusionPipeline

    kwargs = {"use_safetensors": not allow_pickle}
    try:
        return Path(DiffusionPipeline.download(repo_id, local_files_only=True, **kwargs))
    except (OSError, ValueError):
        pass
    try:
        return Path(DiffusionPipeline.download(repo_id, **kwargs))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not available locally and could not be downloaded from the Hugging Face hub "
            f"(offline?); download it where there is network and point -m at the folder or .safetensors file"
        ) from err


def load_model(
    model: str | Path, *, allow_pickle: bool, dtype: torch.dtype, vae_dtype: torch.dtype, empty_unet: bool = False
) -> LoadedModel:
    """Load `model` — a diffusers folder, a single-file checkpoint, or a hub id — as components.
    `empty_unet` (folders only): see `load_folder`."""
    path = Path(model).expanduser()
    if path.is_dir():
        return load_folder(path, allow_pickle, dtype, vae_dtype, empty_unet)
    if path.is_file():
        from turbokit.single_file import load_single_file

        family, components = load_single_file(path, allow_pickle=allow_pickle, torch_dtype=dtype)
        components["vae"].to(vae_dtype)
        return LoadedModel(family, components, path.stem)
    if _HUB_ID.match(str(model)):
        loaded = load_folder(_download(str(model), allow_pickle), allow_pickle, dtype, vae_dtype)
        loaded.name = str(model)
        return loaded
    raise ModelNotFoundError(_not_found(model))


def check_model_source(model: str | Path) -> None:
    """Fail now, before slower work, if `model` is neither a file, a folder, nor a hub id."""
    if not (Path(model).expanduser().exists() or _HUB_ID.match(str(model))):
        raise ModelNotFoundError(_not_found(model))


def _not_found(model: str | Path) -> str:
    return f"model not found: {model} is neither a file, a folder, nor a hub id like org/name"


def load_vae(model: str | Path, *, allow_pickle: bool, dtype: torch.dtype) -> AutoencoderKL:
    """Only the VAE of `model`: from a diffusers folder without loading the rest, otherwise from the whole model."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "vae").is_dir():
            raise ModelNotFoundError(f"{path} has no vae/ folder: give a diffusers model folder")
        return load_part(path, "vae", allow_pickle, dtype)
    return load_model(model, allow_pickle=allow_pickle, dtype=dtype, vae_dtype=dtype).components["vae"]


def load_tiny_vae(path: str | Path, dtype: torch.dtype) -> AutoencoderTiny:
    """A TAESD-style `AutoencoderTiny` decoder from a local diffusers folder (`--tiny-vae`)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"--tiny-vae {path}: not an AutoencoderTiny folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != "AutoencoderTiny":
        raise ModelNotFoundError(f"--tiny-vae {path}: expected an AutoencoderTiny, found {config.get('_class_name')}")
    # diffusers' AutoencoderTiny writes `block_out_channels` into every config it saves and then warns, on
    # load, that the key is unexpected: a warning about itself that no user can act on
    from diffusers import AutoencoderTiny
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def tiny_vae_location(model: str | Path, decoder: str | None, tiny_vae: str | Path | None) -> str | Path | None:
    """The AutoencoderTiny folder to decode with, or None for the full VAE.

    `decoder` is "full", "tiny" or None (tiny exactly when `tiny_vae` is given). "tiny" without
    `tiny_vae` means the model folder's `vae_tiny/`, where `turbokit distill-decoder` can write one."""
    if decoder == "full":
        if tiny_vae is not None:
            raise InvalidRequestError("--decoder full contradicts --tiny-vae: give one of them")
        return None
    if tiny_vae is not None or decoder is None:
        return tiny_vae
    folder = Path(model).expanduser() / TINY_VAE_SUBFOLDER
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"--decoder tiny: {model} has no {TINY_VAE_SUBFOLDER}/ folder; train one with "
            f"`turbokit distill-decoder {model} --data IMAGES --output-dir {folder}`, or pass --tiny-vae PATH"
        )
    return folder
