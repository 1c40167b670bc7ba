"""The discriminators of ADD and LADD: a frozen feature network F and one small trainable head D_k per feature F_k.

Follows StyleGAN-T (Sauer et al. 2023, `networks/discriminator.py`) as ADD does (arXiv 2311.17042, §3):
each head is conv (kernel 1, spectral norm) → batch norm over small virtual batches → LeakyReLU(0.2)
→ residual block of the same with a wider kernel → conv to `cmap_dim` channels, combined with an
embedding of the condition by a dot product (projection discriminator, Miyato & Koyama 2018):

    D_k(F_k(x), c) = ⟨head_k(F_k(x)), cmap_k(c)⟩ / √cmap_dim      per token / spatial position

`add` (DINOv2 tokens of pixels, 1-D heads) and `ladd` (teacher UNet feature maps of latents, 2-D
heads also conditioned on the noise level t̂) differ only in the feature network and the head's
dimensionality. The API splits `features` from `head_logits` so that the trainer can take the R1
penalty with respect to the heads' inputs, as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import Timesteps
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from turbokit.distill.feature_networks import DinoFeatures, FrozenFeatureNetwork, TeacherFeatures
from turbokit.errors import TurbokitError

# Which condition embeddings the heads' projection uses ("text" = pooled text embedding, "image" = the
# DINOv2 CLS embedding of x0). ADD's ablation: none 21.2, text 21.2, image 21.1, both 20.6 FID.
# LADD heads always see the noise level as well.
CONDITIONINGS = {"add": ("none", "text", "image", "text+image"), "ladd": ("none", "text")}
DEFAULT_CONDITIONING = {"add": "text+image", "ladd": "text"}
VIRTUAL_BATCH = 8  # StyleGAN-T's BatchNormLocal default
NOISE_EMBED_DIM = 128  # size of the LADD heads' noise-level embedding


class BatchNormLocal(nn.Module):
    """Batch norm with statistics over virtual batches of about `virtual_batch` samples (StyleGAN-T).

    No running statistics: train and eval behave the same. A batch of B samples is split into
    ⌈B / virtual_batch⌉ nearly equal groups, so any B works (StyleGAN-T's reshape fails when the
    group count does not divide B). Statistics are per channel over the group and all positions.
    """

    def __init__(self, channels: int, virtual_batch: int = VIRTUAL_BATCH, eps: float = 1e-5) -> None:
        super().__init__()
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.ndim)]
        groups = x.tensor_split(math.ceil(len(x) / self.virtual_batch))
        x = torch.cat(
            [
                (g - g.mean(dims, keepdim=True)) * torch.rsqrt(g.var(dims, keepdim=True, unbiased=False) + self.eps)
                for g in groups
            ]
        )
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class MinibatchStd(nn.Module):
    """Appends one channel: how much the samples of each group of about `group` differ (StyleGAN's minibatch
    standard deviation, Karras et al. 2018 §3, groups of 4 as in StyleGAN2).

    The per-group batch norm rescales every group to unit variance, so a head that sees reals and fakes in
    separate batches cannot tell a varied group from a collapsed one; this channel — the std across the group
    per channel and position, averaged to one number — tells it, and its gradient asks the student for variety.
    Groups are nearly equal splits, so any batch size works.
    """

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = [
            (g.var(0, unbiased=False) + 1e-8).sqrt().mean().expand(len(g), 1, *x.shape[2:])
            for g in x.tensor_split(math.ceil(len(x) / self.group))
        ]
        return torch.cat([x, torch.cat(stats)], dim=1)


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class TokenHead(nn.Module):
    """A StyleGAN-T head on ViT tokens (B, C, N) → logits per token (B, N).

    `c_dim` is the size of the condition vector; 0 means unconditional (the last conv then gives
    the logit directly, with no projection term). `minibatch_std` > 0 adds a `MinibatchStd` channel
    over groups of that size before the last conv (not in ADD; off by default).
    """

    conv = nn.Conv1d
    kernel_size = 9  # StyleGAN-T's residual block
    padding_mode = "circular"

    def __init__(
        self,
        channels: int,
        c_dim: int,
        cmap_dim: int = 64,
        virtual_batch: int = VIRTUAL_BATCH,
        minibatch_std: int = 0,
    ) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.main = nn.Sequential(
            self._block(channels, 1, virtual_batch),
            _Residual(self._block(channels, self.kernel_size, virtual_batch)),
            *([MinibatchStd(minibatch_std)] if minibatch_std > 0 else []),
        )
        out_in = channels + (minibatch_std > 0)
        self.out = spectral_norm(self.conv(out_in, cmap_dim if c_dim > 0 else 1, kernel_size=1))
        self.cmap = nn.Linear(c_dim, cmap_dim) if c_dim > 0 else None

    def _block(self, channels: int, kernel_size: int, virtual_batch: int) -> nn.Sequential:
        conv = self.conv(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode=self.padding_mode)
        return nn.Sequential(spectral_norm(conv), BatchNormLocal(channels, virtual_batch), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.out(self.main(x))
        if self.cmap is not None:
            cmap = self.cmap(c).view(len(c), self.cmap_dim, *(1,) * (h.ndim - 2))
            h = (h * cmap).sum(1, keepdim=True) / math.sqrt(self.cmap_dim)
        return h.flatten(1)


class MapHead(TokenHead):
    """The same head on 2-D feature maps (B, C, H, W) → logits per position (B, H·W), for LADD.

    A 3×3 kernel instead of 9: on the UNet's small maps (32² down to 8² for a 512 px SD image) 3×3 already spans
    a large share of the grid, and 9×9 would be 81 taps per channel pair. Zero padding, since a
    2-D map has borders (StyleGAN-T's circular padding is for a 1-D token sequence). The noise level
    t̂ (a UNet timestep) is embedded sinusoidally, passed through an MLP and appended to the condition.
    """

    conv = nn.Conv2d
    kernel_size = 3
    padding_mode = "zeros"

    def __init__(
        self,
        channels: int,
        c_dim: int,
        cmap_dim: int = 64,
        virtual_batch: int = VIRTUAL_BATCH,
        minibatch_std: int = 0,
        noise_dim: int = NOISE_EMBED_DIM,
    ) -> None:
        super().__init__(channels, c_dim + noise_dim, cmap_dim, virtual_batch, minibatch_std)
        self.noise_embedding = nn.Sequential(
            Timesteps(noise_dim, flip_sin_to_cos=True, downscale_freq_shift=0),
            nn.Linear(noise_dim, noise_dim),
            nn.SiLU(),
            nn.Linear(noise_dim, noise_dim),
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, noise_level: torch.Tensor) -> torch.Tensor:
        noise_level = torch.as_tensor(noise_level, device=x.device).expand(len(x))
        noise = self.noise_embedding(noise_level)
        return super().forward(x, noise if c is None else torch.cat([c, noise], dim=1))


class Discriminator(nn.Module):
    """A frozen feature network plus one head per feature it returns; only the heads train.

    The heads are the whole trained state: checkpoint `discriminator.heads.state_dict()` (the full
    state dict also holds the frozen feature network — for LADD, the teacher).
    """

    def __init__(self, feature_network: FrozenFeatureNetwork, heads: Sequence[TokenHead], conditioning: str) -> None:
        super().__init__()
        if len(heads) != len(feature_network.channels):
            raise ValueError(f"{len(heads)} heads for {len(feature_network.channels)} features")
        self.feature_network = feature_network
        self.heads = nn.ModuleList(heads)
        self.conditioning = conditioning
        self.uses_noise_level = isinstance(self.heads[0], MapHead)

    def features(self, x: torch.Tensor, **feature_inputs: object) -> list[torch.Tensor]:
        """F_k(x) for every tapped layer k: no gradient to F's parameters, but to x when x requires it.

        ADD: `x` are images in [-1, 1]. LADD: `x` are noisy latents x_t̂ and `feature_inputs` are
        `timestep` (t̂), `encoder_hidden_states` and, for SDXL, `added_cond_kwargs`.
        """
        return self.feature_network(x, **feature_inputs)

    def head_logits(
        self,
        features: list[torch.Tensor],
        text_embeds: torch.Tensor | None,
        image_embeds: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """D_k(F_k, c) for every head: logits (B, N_k) per token or spatial position.

        `text_embeds`: the pooled text embedding (B, text_dim); `image_embeds`: the CLS embedding
        of the real image x0 (ADD); `noise_level`: t̂ (LADD). Conditions that `conditioning` does not
        enable are ignored.
        """
        c = self._condition(text_embeds, image_embeds)
        if not self.uses_noise_level:
            return [head(f, c) for head, f in zip(self.heads, features, strict=True)]
        if noise_level is None:
            raise ValueError("LADD heads are conditioned on the noise level: pass noise_level")
        return [head(f, c, noise_level) for head, f in zip(self.heads, features, strict=True)]

    def forward(
        self,
        x: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        **feature_inputs: object,
    ) -> list[torch.Tensor]:
        """`head_logits(features(x))`; for LADD `noise_level` t̂ is both the teacher's timestep and the heads' input."""
        if self.uses_noise_level:
            if noise_level is None:
                raise ValueError("LADD heads are conditioned on the noise level: pass noise_level")
            feature_inputs["timestep"] = noise_level
        return self.head_logits(self.features(x, **feature_inputs), text_embeds, image_embeds, noise_level)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters: everything the discriminator optimizer should update."""
        return list(self.heads.parameters())

    def train(self, mode: bool = True) -> Discriminator:
        super().train(mode)
        self.feature_network.train(False)
        return self

    def _condition(self, text_embeds: torch.Tensor | None, image_embeds: torch.Tensor | None) -> torch.Tensor | None:
        parts = []
        for name, embeds in (("text", text_embeds), ("image", image_embeds)):
            if name in self.conditioning.split("+"):
                if embeds is None:
                    raise ValueError(f"conditioning {self.conditioning!r} needs {name}_embeds")
                parts.append(embeds.float())
        return torch.cat(parts, dim=1) if parts else None


def build_discriminator(
    method: str,
    *,
    dino: DinoFeatures | None = None,
    teacher_unet: UNet2DConditionModel | None = None,
    text_dim: int,
    conditioning: str | None = None,
    cmap_dim: int = 64,
    virtual_batch: int = VIRTUAL_BATCH,
    minibatch_std: int = 0,
) -> Discriminator:
    """The discriminator of `method` "add" (heads on `dino`) or "ladd" (heads on `teacher_unet`).

    `text_dim`: size of the pooled text embedding (SD 2.x: the CLIP text model's pooler output,
    1024; SDXL: the second encoder's projected embedding, 1280). `conditioning`: one of
    `CONDITIONINGS[method]`, by default everything the method supports ("text+image" / "text").
    `minibatch_std`: group size of each head's `MinibatchStd` channel (0: none, as in ADD).
    """
    if method not in CONDITIONINGS:
        raise TurbokitError(f"unknown distillation method {method!r}; expected one of {tuple(CONDITIONINGS)}")
    conditioning = conditioning or DEFAULT_CONDITIONING[method]
    if conditioning not in CONDITIONINGS[method]:
        raise TurbokitError(
            f"discriminator conditioning {conditioning!r} is not available for {method}; "
            f"choose one of {CONDITIONINGS[method]}"
        )
    if method == "add":
        if dino is None:
            raise ValueError("the ADD discriminator needs the DINOv2 feature network (dino=)")
        feature_network, head_type = dino, TokenHead
    else:
        if teacher_unet is None:
            raise ValueError("the LADD discriminator needs the teacher UNet (teacher_unet=)")
        feature_network, head_type = TeacherFeatures(teacher_unet), MapHead
    enabled = conditioning.split("+")
    c_dim = (text_dim if "text" in enabled else 0) + (feature_network.cond_dims["image"] if "image" in enabled else 0)
    heads = [
        head_type(channels, c_dim, cmap_dim, virtual_batch, minibatch_std) for channels in feature_network.channels
    ]
    return Discriminator(feature_network, heads, conditioning)
