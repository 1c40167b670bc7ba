"""Diffusers → Stability "original" (ldm/sgm) key layout, for writing single-file checkpoints.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils`), so this module
derives each original key from the diffusers block structure:

* UNet: `input_blocks.0` is `conv_in`; then each down level has `layers_per_block` input blocks
  (resnet at `.0`, attention at `.1`) followed by one block holding only the downsampler
  (`.0.op`). The middle block is resnet / attention / resnet. Each up level has
  `layers_per_block + 1` output blocks; the upsampler sits in the level's last block, right after
  its other layers (`.1.conv` without attention, `.2.conv` with it).
* VAE: `encoder.down.{i}.block.{j}`; the decoder's `up.{i}` counts from the *lowest* resolution
  upwards in diffusers but from the highest in the original, so it is reversed. The mid-block
  attention is a 1×1 conv in the original and a Linear in diffusers.
* OpenAI CLIP (SD 1.x, SDXL's first encoder) was already a transformers model, keys unchanged.
* OpenCLIP (SD 2.x, SDXL's second encoder) uses `nn.MultiheadAttention`: q, k and v are one
  `in_proj` matrix, and `text_projection` is applied as `x @ P` (the transpose of a Linear weight).

Every function works on meta tensors too (only shapes), which the tests use to check full-size
models without allocating them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from turbokit.errors import TurbokitError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family keeps its text encoders, and whether each is OpenAI CLIP ("clip", keys as in
# transformers) or OpenCLIP ("openclip", keys as in open_clip).
TEXT_ENCODER_PREFIXES: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
}

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/pooled-text embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SLOT = {"resnets": 0, "attentions": 1}  # position of each layer inside an original block
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _unsupported(part: str, key: str) -> TurbokitError:
    return TurbokitError(
        f"cannot write the {part} to a single file: its weight {key!r} has no place in the original "
        "SD/SDXL layout (only standard SD 1.x/2.x/SDXL UNets, AutoencoderKL VAEs and CLIP text encoders can be written)"
    )


def _split(rest: str, table: Mapping[str, str]) -> str | None:
    """Rename the leading module of `rest` ("conv1.weight") through `table`; None if not in it."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def _count(keys: list[str], pattern: str) -> int:
    """How many distinct indices the first group of `pattern` takes over `keys`."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def unet_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers `UNet2DConditionModel` state dict in original keys (without the `model.diffusion_model.` prefix)."""
    keys = list(state_dict)
    per_level = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")  # = layers_per_block
    if per_level == 0:
        raise _unsupported("UNet", keys[0] if keys else "(empty)")
    up_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _split(key, _UNET_TOP)
        if new is None:
            new = _unet_block_key(key, per_level, up_attention)
        if new is None:
            raise _unsupported("UNet", key)
        out[new] = value
    return out


def _unet_block_key(key: str, per_level: int, up_attention: set[int]) -> str | None:
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = 1 + int(m[1]) * (per_level + 1) + int(m[3])
        return _layer(f"input_blocks.{block}.{_SLOT[m[2]]}", m[2], m[4])
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block = 1 + int(m[1]) * (per_level + 1) + per_level
        return f"input_blocks.{block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        # resnets 0, 1 → middle_block 0, 2; attentions 0 → middle_block 1
        return _layer(f"middle_block.{2 * int(m[2]) + _SLOT[m[1]]}", m[1], m[3])
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = int(m[1]) * (per_level + 1) + int(m[3])
        return _layer(f"output_blocks.{block}.{_SLOT[m[2]]}", m[2], m[4])
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        block = level * (per_level + 1) + per_level
        return f"output_blocks.{block}.{2 if level in up_attention else 1}.conv.{m[2]}"
    return None


def _layer(prefix: str, kind: str, rest: str) -> str | None:
    """A resnet's sub-layers are renamed; a transformer's keep diffusers' names."""
    if kind == "attentions":
        return f"{prefix}.{rest}"
    renamed = _split(rest, _UNET_RESNET)
    return None if renamed is None else f"{prefix}.{renamed}"


def vae_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers `AutoencoderKL` state dict in original keys (without the `first_stage_model.` prefix)."""
    keys = list(state_dict)
    levels = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new, tensor = _vae_key(key, levels), value
        if new is None:
            raise _unsupported("VAE", key)
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            tensor = value[:, :, None, None]  # Linear → 1×1 conv
        out[new] = tensor
    return out


def _vae_key(key: str, levels: int) -> str | None:
    if m := re.match(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)", key):
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}"
    if re.match(r"(quant_conv|post_quant_conv)\.", key):
        return key
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        renamed = _split(m[2], _VAE_ATTENTION)
        return None if renamed is None else f"{m[1]}.mid.attn_1.{renamed}"
    return None


def _text_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # transformers ≥ 5.6 flattened CLIPTextModel (no `text_model.`); WithProjection still nests it.
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An OpenAI-CLIP `CLIPTextModel` state dict in original keys (relative to `...transformer.`)."""
    out = {f"text_model.{k}": v for k, v in _text_keys(state_dict).items()}
    # Released files carry the (now non-persistent) position ids; some tools treat their absence as damage.
    positions = out["text_model.embeddings.position_embedding.weight"]
    out["text_model.embeddings.position_ids"] = torch.arange(positions.shape[0], device=positions.device)[None]
    return out


def open_clip_to_original(state_dict: Mapping[str, Tensor], extra_final_block: bool = False) -> dict[str, Tensor]:
    """A `CLIPTextModel[WithProjection]` state dict in OpenCLIP keys (relative to `...model.`).

    `extra_final_block` appends one identity resblock and an identity `text_projection`: SD 2.x
    files hold all 24 layers of OpenCLIP ViT-H but SD 2.x conditions on the penultimate layer, so
    diffusers models (and the original code, which stops one block before the end) never run the
    last one. The identity block keeps that layout — and the embeddings — for any depth.
    """
    sd = _text_keys(state_dict)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # Linear weight (out, in) → matrix (in, out)
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif (m := re.match(r"encoder\.layers\.(\d+)\.(.+)", key)) and (renamed := _split(m[2], _OPENCLIP_LAYER)):
            out[f"transformer.resblocks.{m[1]}.{renamed}"] = value
        else:
            raise _unsupported("text encoder", key)
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise _unsupported("text encoder", f"encoder.layers.{layer}.self_attn ({param})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if extra_final_block:
        out.update(_identity_block(out))
    return out


def _identity_block(original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A resblock after the last one that leaves its input unchanged (all output projections zero)."""
    last = max(int(m[1]) for k in original if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    prefix = f"transformer.resblocks.{last}."
    block: dict[str, Tensor] = {}
    for key, value in original.items():
        if key.startswith(prefix):
            name = key[len(prefix) :]
            is_norm_weight = name in ("ln_1.weight", "ln_2.weight")
            block[f"transformer.resblocks.{last + 1}.{name}"] = (
                torch.ones_like(value) if is_norm_weight else torch.zeros_like(value)
            )
    if "text_projection" not in original:  # unused by SD 2.x, present in its files
        embedding = original["token_embedding.weight"]
        block["text_projection"] = torch.eye(embedding.shape[1], dtype=embedding.dtype, device=embedding.device)
    return block


def to_original_layout(state_dicts: Mapping[str, Mapping[str, Tensor]], family: str) -> dict[str, Tensor]:
    """One original-layout state dict from the diffusers state dicts of `unet`, `vae` and the text encoder(s)."""
    if family not in TEXT_ENCODER_PREFIXES:
        raise TurbokitError(f"unknown model family {family!r}; expected one of {', '.join(TEXT_ENCODER_PREFIXES)}")
    out = {UNET_PREFIX + k: v for k, v in unet_to_original(state_dicts["unet"]).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_original(state_dicts["vae"]).items()})
    for name, (prefix, kind) in TEXT_ENCODER_PREFIXES[family].items():
        if name not in state_dicts:
            raise TurbokitError(f"cannot write a {family} single file without its {name}")
        if kind == "clip":
            mapped = clip_to_original(state_dicts[name])
        else:
            mapped = open_clip_to_original(state_dicts[name], extra_final_block=family == "sd2")
        out.update({prefix + k: v for k, v in mapped.items()})
    return out
