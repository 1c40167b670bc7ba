"""What differs between the SD 1.x/2.x and SDXL families: how prompts become UNet conditioning.

One pipeline serves both; each family is a small strategy object that encodes prompts and adds the
family's extra UNet inputs (SDXL's pooled text embedding and size/crop micro-conditioning).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # not imported at run time: a warm OpenVINO launch runs without transformers' models
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def family_of(unet_config: Mapping, text_hidden_size: int | None = None) -> str:
    """SDXL if the UNet takes SDXL's text/time embedding; otherwise SD 1.x (768-wide CLIP-L context) or 2.x."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = unet_config.get("cross_attention_dim")
    width = text_hidden_size or (cross[0] if isinstance(cross, list | tuple) else cross)
    return "sd1" if width == 768 or unet_config.get("use_linear_projection") is False else "sd2"


@dataclass
class Conditioning:
    """Text conditioning for a batch: per-token embeddings and, for SDXL, the pooled embedding."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor | list[int] | slice) -> Conditioning:
        return Conditioning(self.embeds[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.embeds for p in parts]), pooled)

    def zeros_like(self) -> Conditioning:
        return Conditioning(
            torch.zeros_like(self.embeds), None if self.pooled is None else torch.zeros_like(self.pooled)
        )


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    # Truncation to CLIP's 77 tokens is silent here as in every SD tool; the CLI warns about it.
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class SDFamily:
    """SD 1.x and 2.x: one CLIP text encoder, its last hidden state as cross-attention context."""

    name = "sd"
    zero_negative = False

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    @torch.no_grad()  # not inference_mode: the trainer feeds these embeddings to a UNet under autograd
    def encode(self, prompts: list[str]) -> Conditioning:
        ids = _token_ids(self.tokenizer, prompts).to(self.text_encoder.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        out = self.text_encoder(ids, attention_mask=mask)
        # The pooled (end-token) embedding is not a UNet input for SD, but ADD's discriminator is conditioned on it.
        return Conditioning(out.last_hidden_state, out.pooler_output)

    def unet_kwargs(self, cond: Conditioning, height: int, width: int) -> dict[str, object]:
        return {}


class SDXLFamily:
    """SDXL: two text encoders' penultimate hidden states concatenated, the second's pooled
    projection, and `time_ids` = (original size, crop top-left, target size)."""

    name = "sdxl"

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        self.encoders = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)]
        # SDXL's negative conditioning is all zeros when no negative prompt is given.
        self.zero_negative = force_zeros_for_empty_prompt

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in self.encoders:
            out = encoder(_token_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            if getattr(out, "text_embeds", None) is not None:  # CLIPTextModelWithProjection's output
                pooled = out.text_embeds
            hidden.append(out.hidden_states[-2])
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def unet_kwargs(self, cond: Conditioning, height: int, width: int) -> dict[str, object]:
        time_ids = torch.tensor(
            [[height, width, 0, 0, height, width]], dtype=cond.embeds.dtype, device=cond.embeds.device
        )
        return {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(len(cond.embeds), 1)}}


Family = SDFamily | SDXLFamily


def build_family(name: str, components: Mapping[str, object], force_zeros_for_empty_prompt: bool = True) -> Family:
    """The conditioning strategy for a model of family `name` ("sd1", "sd2" or "sdxl") from its components."""
    c = components
    if name == "sdxl":
        return SDXLFamily(
            c["text_encoder"], c["text_encoder_2"], c["tokenizer"], c["tokenizer_2"], force_zeros_for_empty_prompt
        )
    return SDFamily(c["text_encoder"], c["tokenizer"])
