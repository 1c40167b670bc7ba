"""Single-file checkpoints in Stability's original layout (`sd_turbo.safetensors`, `sd_xl_turbo_1.0_fp16.safetensors`).

Loading reuses diffusers' own ldm → diffusers converters; the configs come from the weights'
shapes on top of the shipped Turbo configs, so nothing is fetched from the hub. Saving is the
reverse mapping in `turbokit.original_layout` (diffusers ships no such direction).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.schedulers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.utils import is_accelerate_available
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from turbokit.configs import turbo_config_dir
from turbokit.errors import ModelNotFoundError, TurbokitError
from turbokit.loading import PICKLE_REFUSAL, PICKLE_SUFFIXES
from turbokit.original_layout import TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIX, to_original_layout
from turbokit.tokenizer import PAD_OPENAI, PAD_OPENCLIP, clip_tokenizer

__all__ = ["detect_family", "infer_configs", "load_single_file", "read_state_dict", "save_single_file"]

FAMILIES = ("sd1", "sd2", "sdxl")
SAMPLE_SIZE_KEY = "turbokit.sample_size"  # metadata: the UNet's native latent size (tiny models differ)
_HEAD_WIDTH = 64  # SD 2.x / SDXL UNet heads and every CLIP text encoder's heads are 64 channels wide
_SD1_HEADS = 8  # SD 1.x UNets use 8 heads at every level instead
_EXPECTED = (
    "expected a Stable Diffusion 1.x, 2.x or SDXL checkpoint in the original single-file layout "
    "(UNet under 'model.diffusion_model.', VAE under 'first_stage_model.', text encoders under "
    "'cond_stage_model.' or 'conditioner.embedders.')"
)
# Non-SD formats a user may plausibly pass, recognised by a telltale key, for a better message.
_OTHER_FORMATS = (
    ("joint_blocks.", "an SD3 model"),
    ("double_blocks.", "a Flux model"),
    ("conditioner.embedders.0.model.", "an SDXL refiner"),
    ("down_blocks.", "a diffusers-format component (load its model folder instead)"),
)

M = TypeVar("M", bound=nn.Module)


# --- reading ---------------------------------------------------------------------------------------


def read_state_dict(path: Path, allow_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a checkpoint file and its safetensors `__metadata__` ({} for pickle files).

    Pickle formats (.ckpt/.pt/.pth/.bin) are refused unless `allow_pickle`: unpickling runs code.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {key: f.get_tensor(key) for key in f.keys()}, metadata  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelNotFoundError(
                f"{path} is not a readable .safetensors file (corrupt or incomplete?): {exc}"
            ) from exc
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise TurbokitError(f"refusing to load {path}: {PICKLE_REFUSAL}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # unpickling can fail in arbitrary ways; all mean "unreadable file"
            raise ModelNotFoundError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
        while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = checkpoint["state_dict"]  # Lightning checkpoints nest the weights
        if not isinstance(checkpoint, dict):
            raise ModelNotFoundError(f"{path} holds a {type(checkpoint).__name__}, not a state dict of tensors")
        return {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}, {}
    raise ModelNotFoundError(f"{path}: unsupported checkpoint type {suffix or '(no suffix)'}; expected .safetensors")


def detect_family(keys: Iterable[str]) -> str:
    """The family ("sd1", "sd2" or "sdxl") of an original-layout checkpoint, from its tensor names."""
    names = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in names)

    if has(UNET_PREFIX + "input_blocks."):
        if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
            return "sdxl"
        if has("cond_stage_model.model."):
            return "sd2"
        if has("cond_stage_model.transformer."):
            return "sd1"
    hints = [what for marker, what in _OTHER_FORMATS if any(marker in k for k in names)]
    if hints:
        found = f"this looks like {hints[0]}"
    elif has(UNET_PREFIX + "input_blocks."):
        found = "it has SD UNet weights but no text encoder weights"
    else:
        found = f"found {len(names)} tensors such as {names[:3]}"
    raise ModelNotFoundError(f"not a supported checkpoint: {_EXPECTED}; {found}")


# --- configs ---------------------------------------------------------------------------------------


def _template(family: str, part: str) -> dict:
    name = "scheduler/scheduler_config.json" if part == "scheduler" else f"{part}/config.json"
    config = json.loads((turbo_config_dir(family) / name).read_text())
    for key in ("_diffusers_version", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        config.pop(key, None)
    return config


class _Shapes:
    """Shape look-ups into a state dict (tensors or meta tensors) below one prefix, with clear errors."""

    def __init__(self, state_dict: Mapping[str, Tensor], prefix: str, part: str) -> None:
        self.sd, self.prefix, self.part = state_dict, prefix, part
        self.keys = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
        if not self.keys:
            raise ModelNotFoundError(f"the checkpoint has no {part} weights (nothing under {prefix!r}); {_EXPECTED}")

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.sd

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self:
            raise ModelNotFoundError(
                f"the checkpoint's {self.part} lacks {self.prefix + key}: incomplete or unsupported"
            )
        return tuple(self.sd[self.prefix + key].shape)

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct values of the first group of `pattern` (a regex over keys below the prefix)."""
        regex = re.compile(pattern)
        return sorted({int(m.group(1)) for k in self.keys if (m := regex.match(k))})


def _unet_config(sd: Mapping[str, Tensor], family: str, pooled_dim: int | None) -> dict:
    s = _Shapes(sd, UNET_PREFIX, "UNet")
    config = _template(family, "unet")
    blocks = s.indices(r"input_blocks\.(\d+)\.")
    # Input blocks after conv_in: resnet(+attention) blocks, each level closed by a downsampler block.
    levels: list[list[int]] = [[]]
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in s:
            levels.append([])
        else:
            levels[-1].append(i)
    per_level = len(levels[0])
    if per_level == 0 or any(len(level) != per_level for level in levels):
        raise TurbokitError("unsupported UNet layout: levels with different numbers of resnets")

    def depth(block: str) -> int:  # transformer layers inside one attention block (0 = none)
        return len(s.indices(re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\."))

    channels = [s.shape(f"input_blocks.{level[0]}.0.out_layers.3.weight")[0] for level in levels]
    down_depths = [depth(f"input_blocks.{level[0]}") for level in levels]
    up_depths = [depth(f"output_blocks.{u * (per_level + 1)}") for u in range(len(levels))]
    mid_depth = depth("middle_block")
    if up_depths != down_depths[::-1] or mid_depth == 0 or (down_depths[-1] and down_depths[-1] != mid_depth):
        raise TurbokitError("unsupported UNet layout: up and down levels (or the middle block) differ in attention")
    # Levels without attention get 1 (as in the released configs), except that the mid block reads the last entry.
    layers = [d or 1 for d in down_depths[:-1]] + [mid_depth]
    attention = next(k for k in s.keys if ".transformer_blocks.0.attn2.to_k.weight" in k)
    proj_in = next(k for k in s.keys if k.endswith(".proj_in.weight"))
    time_dim = s.shape("time_embed.0.weight")[0]
    config.update(
        in_channels=s.shape("input_blocks.0.0.weight")[1],
        out_channels=s.shape("out.2.weight")[0],
        block_out_channels=channels,
        layers_per_block=per_level,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depths],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        cross_attention_dim=s.shape(attention)[1],
        use_linear_projection=len(s.shape(proj_in)) == 2,  # SD 1.x projects with 1×1 convs
        attention_head_dim=_SD1_HEADS if family == "sd1" else [c // _HEAD_WIDTH for c in channels],
        time_embedding_dim=None if time_dim == 4 * channels[0] else time_dim,
    )
    if family == "sdxl":
        # SDXL's extra embedding takes the pooled text embedding plus 6 Fourier-embedded size numbers.
        adm_in = s.shape("label_emb.0.0.weight")[1]
        if pooled_dim is None or (adm_in - pooled_dim) <= 0 or (adm_in - pooled_dim) % 6:
            raise TurbokitError(
                f"unsupported SDXL UNet: label_emb input {adm_in} does not fit a pooled size {pooled_dim}"
            )
        config.update(projection_class_embeddings_input_dim=adm_in, addition_time_embed_dim=(adm_in - pooled_dim) // 6)
    elif "label_emb.0.0.weight" in s:
        raise TurbokitError(
            "unsupported UNet: class-conditioned SD 1.x/2.x variants (unCLIP, upscalers) cannot be loaded"
        )
    return config


def _vae_config(sd: Mapping[str, Tensor], family: str) -> dict:
    s = _Shapes(sd, VAE_PREFIX, "VAE")
    config = _template(family, "vae")
    levels = s.indices(r"encoder\.down\.(\d+)\.")
    per_level = len(s.indices(r"encoder\.down\.0\.block\.(\d+)\."))
    if len(s.indices(r"decoder\.up\.0\.block\.(\d+)\.")) != per_level + 1:
        raise TurbokitError("unsupported VAE layout: decoder levels must have one more resnet than encoder levels")
    config.update(
        in_channels=s.shape("encoder.conv_in.weight")[1],
        out_channels=s.shape("decoder.conv_out.weight")[0],
        latent_channels=s.shape("decoder.conv_in.weight")[1],
        block_out_channels=[s.shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        layers_per_block=per_level,
    )
    if family == "sd1":
        config["sample_size"] = 512
    if "quant_conv.weight" not in s:
        config["use_quant_conv"] = False
    if "post_quant_conv.weight" not in s:
        config["use_post_quant_conv"] = False
    if "encoder.mid.attn_1.q.weight" not in s:
        config["mid_block_add_attention"] = False
    return config


def _clip_prefix(sd: Mapping[str, Tensor], prefix: str) -> str:
    # Checkpoints from old transformers versions lack the `text_model.` level.
    nested = prefix + "text_model."
    return nested if any(k.startswith(nested) for k in sd) else prefix


def _text_config(sd: Mapping[str, Tensor], family: str, name: str) -> dict:
    prefix, kind = TEXT_ENCODER_PREFIXES[family][name]
    config = _template(family, name)  # sd1 starts from sd-turbo's: every size and the activation are set below
    if kind == "clip":
        s = _Shapes(sd, _clip_prefix(sd, prefix), name)
        vocab, hidden = s.shape("embeddings.token_embedding.weight")
        layers = len(s.indices(r"encoder\.layers\.(\d+)\."))
        config.update(
            hidden_act="quick_gelu",  # OpenAI CLIP
            max_position_embeddings=s.shape("embeddings.position_embedding.weight")[0],
            intermediate_size=s.shape("encoder.layers.0.mlp.fc1.weight")[0],
            projection_dim=hidden,
        )
    else:
        s = _Shapes(sd, prefix, name)
        vocab, hidden = s.shape("token_embedding.weight")
        layers = len(s.indices(r"transformer\.resblocks\.(\d+)\."))
        if family == "sd2":
            # SD 2.x conditions on the penultimate layer; diffusers drops the unused last block (24 → 23).
            layers -= 1
        elif "text_projection" in s:
            config["projection_dim"] = s.shape("text_projection")[1]
        config.update(
            hidden_act="gelu",  # OpenCLIP
            max_position_embeddings=s.shape("positional_embedding")[0],
            intermediate_size=s.shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
        )
    config.update(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // _HEAD_WIDTH
    )
    return config


def infer_configs(state_dict: Mapping[str, Tensor], family: str) -> dict[str, dict]:
    """Diffusers/transformers configs of every component, from the weights' shapes.

    Starts from the family's shipped Turbo configs (so the Turbo scheduler, scaling factors and
    defaults apply) and overrides everything the tensors determine. Values only need `.shape`,
    so meta tensors work. Keys: unet, vae, text_encoder[, text_encoder_2], scheduler.
    """
    if family not in FAMILIES:
        raise TurbokitError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    configs = {"text_encoder": _text_config(state_dict, family, "text_encoder")}
    pooled_dim = None
    if family == "sdxl":
        configs["text_encoder_2"] = _text_config(state_dict, family, "text_encoder_2")
        pooled_dim = configs["text_encoder_2"]["projection_dim"]
    configs["unet"] = _unet_config(state_dict, family, pooled_dim)
    configs["vae"] = _vae_config(state_dict, family)
    configs["scheduler"] = _template(family, "scheduler")
    return configs


# --- loading ---------------------------------------------------------------------------------------


def _empty(factory: Callable[[], M]) -> M:
    """Build a model without initialising weights that the checkpoint replaces anyway (as diffusers does)."""
    if is_accelerate_available():
        from accelerate import init_empty_weights

        context = init_empty_weights()  # parameters on meta; buffers (CLIP's position ids) stay real
    else:
        context = contextlib.nullcontext()
    with context:
        return factory()


def _fill(model: M, weights: Mapping[str, Tensor], part: str, dtype: torch.dtype | None) -> M:
    """Put `weights` into `model` (strictly: every parameter, nothing extra), cast to `dtype`."""
    # Cast before assigning: diffusers' ModelMixin.to(dtype) warns about fp32-pinned modules.
    weights = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in weights.items()
        if v is not None
    }
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches: the inferred config does not fit
        raise TurbokitError(f"the checkpoint's {part} weights do not fit its inferred architecture: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise TurbokitError(
            f"the checkpoint's {part} weights do not match its inferred architecture "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return model.eval()


def _text_encoder(
    state_dict: Mapping[str, Tensor], family: str, name: str, config: dict, dtype: torch.dtype | None
) -> nn.Module:
    prefix, kind = TEXT_ENCODER_PREFIXES[family][name]
    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    text_config = CLIPTextConfig.from_dict(config)
    model = _empty(lambda: cls(text_config))
    if kind == "clip":
        weights = convert_ldm_clip_checkpoint(state_dict)  # strips both families' CLIP prefixes
    else:
        weights = convert_open_clip_checkpoint(model, state_dict, prefix=prefix)
    # Flattened CLIPTextModel (transformers ≥ 5.6) has no `text_model.`; old checkpoints carry position_ids.
    if not hasattr(model, "text_model"):
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    if family == "sd2":
        # diffusers skips only a 24th block by name; drop whatever block is past the config's depth.
        depth = config["num_hidden_layers"]
        weights = {k: v for k, v in weights.items() if not _layer_at_or_after(k, depth)}
        weights.pop("text_projection.weight", None)
    return _fill(model, weights, name.replace("_", " "), dtype)


def _layer_at_or_after(key: str, depth: int) -> bool:
    m = re.search(r"encoder\.layers\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= depth


def _scheduler(family: str) -> EulerDiscreteScheduler | EulerAncestralDiscreteScheduler:
    cls = EulerAncestralDiscreteScheduler if family == "sdxl" else EulerDiscreteScheduler
    return cls.from_config(_template(family, "scheduler"))


def load_single_file(
    path: Path, allow_pickle: bool = False, torch_dtype: torch.dtype | None = torch.float32
) -> tuple[str, dict[str, object]]:
    """(family, components) of an original-layout checkpoint, keyed like a diffusers pipeline.

    Works offline: configs are inferred from the weights, tokenizers are rebuilt locally and the
    scheduler is the family's Turbo scheduler.
    """
    path = Path(path)
    state_dict, metadata = read_state_dict(path, allow_pickle=allow_pickle)
    try:
        family = detect_family(state_dict)
        configs = infer_configs(state_dict, family)
    except TurbokitError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    if metadata.get(SAMPLE_SIZE_KEY, "").isdigit():  # files written by save_single_file (tiny models)
        configs["unet"]["sample_size"] = int(metadata[SAMPLE_SIZE_KEY])
        configs["vae"]["sample_size"] = int(metadata[SAMPLE_SIZE_KEY]) * 2 ** (
            len(configs["vae"]["block_out_channels"]) - 1
        )
    unet_config, vae_config = configs["unet"], configs["vae"]
    unet = _empty(lambda: UNet2DConditionModel.from_config(unet_config))
    vae = _empty(lambda: AutoencoderKL.from_config(vae_config))
    components: dict[str, object] = {
        "unet": _fill(unet, convert_ldm_unet_checkpoint(state_dict, copy.deepcopy(unet_config)), "UNet", torch_dtype),
        "vae": _fill(vae, convert_ldm_vae_checkpoint(state_dict, copy.deepcopy(vae_config)), "VAE", torch_dtype),
        "text_encoder": _text_encoder(state_dict, family, "text_encoder", configs["text_encoder"], torch_dtype),
        "tokenizer": clip_tokenizer(PAD_OPENCLIP if family == "sd2" else PAD_OPENAI),
        "scheduler": _scheduler(family),
    }
    if family == "sdxl":
        components["text_encoder_2"] = _text_encoder(
            state_dict, family, "text_encoder_2", configs["text_encoder_2"], torch_dtype
        )
        components["tokenizer_2"] = clip_tokenizer(PAD_OPENCLIP)
    return family, components


# --- saving ----------------------------------------------------------------------------------------


def save_single_file(
    components: Mapping[str, object], family: str, path: Path, dtype: torch.dtype | None = None
) -> Path:
    """Write the UNet, VAE and text encoder(s) as one original-layout `.safetensors` file.

    The file loads with `load_single_file` and with diffusers' `from_single_file`. It is written
    to a temporary name first, so an interrupted save never leaves a truncated checkpoint.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TurbokitError(f"{path}: single files are written as .safetensors; use that suffix")
    if family not in FAMILIES:
        raise TurbokitError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    names = ["unet", "vae", *TEXT_ENCODER_PREFIXES[family]]
    missing = [n for n in names if n not in components]
    if missing:
        raise TurbokitError(f"cannot write a {family} single file without {', '.join(missing)}")
    for name, (_, kind) in TEXT_ENCODER_PREFIXES[family].items():
        # The layout implies the activation (OpenAI CLIP: quick_gelu, OpenCLIP: gelu); a mismatch would load wrong.
        act = getattr(getattr(components[name], "config", None), "hidden_act", None)
        expected = "quick_gelu" if kind == "clip" else "gelu"
        if act != expected:
            raise TurbokitError(
                f"the {name} uses {act!r} but a {family} single file implies {expected!r}: wrong family?"
            )
    state_dicts = {name: components[name].state_dict() for name in names}  # type: ignore[attr-defined]
    tensors = {k: _to_cpu(v, dtype) for k, v in to_original_layout(state_dicts, family).items()}
    metadata = {"format": "pt", "turbokit.family": family}
    sample_size = getattr(getattr(components["unet"], "config", None), "sample_size", None)
    if isinstance(sample_size, int):
        metadata[SAMPLE_SIZE_KEY] = str(sample_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _to_cpu(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    tensor = tensor.detach().cpu()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()
