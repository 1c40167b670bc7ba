"""Frozen feature networks F of the discriminators: DINOv2 on pixels (ADD) and the teacher UNet on latents (LADD).

Both are frozen (no parameter requires grad, always in eval mode) but differentiable with respect to
their input, so that the generator loss −Σ_k D_k(F_k(x̂)) reaches the student through them. Both
return one tensor per tapped layer, channels first, for the heads in `turbokit.distill.discriminator`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import Dinov2Model

from turbokit.errors import TurbokitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenFeatureNetwork(nn.Module):
    """A feature network whose parameters never train and which stays in eval mode under `.train()`."""

    channels: list[int]  # channels of each returned feature, one head per entry
    cond_dims: dict[str, int]  # sizes of the condition embeddings this network provides (e.g. "image")

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenFeatureNetwork:
        return super().train(False)


def evenly_spaced_layers(num_blocks: int, num_taps: int = 4) -> list[int]:
    """Hidden-state indices of the patch embedding (0) and `num_taps` evenly spaced blocks, the last included.

    For a 12-block ViT-S: [0, 3, 6, 9, 12], i.e. StyleGAN-T's patch embedding plus (0-based) blocks 2, 5, 8, 11.
    """
    return [0] + [(i + 1) * num_blocks // num_taps for i in range(num_taps)]


class DinoFeatures(FrozenFeatureNetwork):
    """Tokens of a frozen DINOv2 ViT at several blocks, the feature network of ADD (best in its ablation: ViT-S).

    `layers` are indices into the model's hidden states: 0 is the patch embedding (with CLS token and
    position embeddings added), k the output of block k (1-based, before the final layer norm).
    """

    def __init__(self, model: Dinov2Model, image_size: int = 224, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        num_blocks = model.config.num_hidden_layers
        self.layers = list(layers) if layers is not None else evenly_spaced_layers(num_blocks)
        if not self.layers or not all(0 <= k <= num_blocks for k in self.layers):
            raise ValueError(f"layers must be hidden-state indices in 0..{num_blocks}, got {self.layers}")
        self.model = model
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        hidden = model.config.hidden_size
        self.channels = [hidden] * len(self.layers)
        self.cond_dims = {"image": hidden}  # the CLS embedding of x0, see `cls_embedding`
        self._freeze()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, image_size: int = 224, layers: Sequence[int] | None = None
    ) -> DinoFeatures:
        """Load a local DINOv2 folder (e.g. a download of facebook/dinov2-small); never reaches the hub."""
        path = Path(path)
        hint = "pass --dino_model PATH to a local facebook/dinov2-small folder (config.json and weights)"
        config_file = path / "config.json"
        if not config_file.is_file():
            raise TurbokitError(f"no DINOv2 model at {path} (no config.json there); {hint}")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "dinov2":
            raise TurbokitError(f"{path} holds a {model_type!r} model, not DINOv2; {hint}")
        try:
            model = Dinov2Model.from_pretrained(path, local_files_only=True)
        except OSError as error:
            raise TurbokitError(f"cannot load the DINOv2 model at {path} ({error}); {hint}") from error
        return cls(model, image_size=image_size, layers=layers)

    def _pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → resized to the network's size and ImageNet-normalised, as DINOv2 expects."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            # plain bilinear as in StyleGAN-T (no antialiasing); differentiable, so D's gradient reaches x̂
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=False
            )
        return ((images + 1) / 2 - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tokens (B, C, N) of each tapped layer, CLS token removed, in float32."""
        hidden = self.model(self._pixel_values(images), output_hidden_states=True).hidden_states
        return [hidden[k][:, 1:].transpose(1, 2).float() for k in self.layers]

    @torch.no_grad()
    def cls_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The final-layer CLS embedding (B, C): ADD's image condition c_img of the real image x0."""
        return self.model(self._pixel_values(images)).pooler_output.float()


class _StopForward(Exception):
    """Raised by a hook after the mid block: the up blocks' output is not needed."""


class TeacherFeatures(FrozenFeatureNetwork):
    """Feature maps of the frozen teacher UNet at noise level t̂, the feature network of LADD.

    Taps the output of every down block and of the mid block (the natural UNet counterpart of
    LADD's per-attention-block tokens). The UNet's own forward runs — time embedding, SDXL's
    added text/time embedding and all — and a hook stops it after the mid block, so the up blocks
    never run. The hooks live only for the duration of a call: the same UNet serves as the teacher.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        widths = list(unet.config.block_out_channels)
        self.channels = widths + ([widths[-1]] if unet.mid_block is not None else [])
        self.cond_dims = {}
        self._freeze()

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Feature maps (B, C_k, H_k, W_k) in float32 of noisy latents x_t̂ at the UNet timestep t̂ = `timestep`."""
        maps: list[torch.Tensor] = []

        def keep(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            maps.append(output[0] if isinstance(output, tuple) else output)  # down blocks return (h, skips)

        def keep_and_stop(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            keep(module, args, output)
            raise _StopForward

        dtype = self.unet.dtype
        if added_cond_kwargs is not None:
            added_cond_kwargs = {name: value.to(dtype) for name, value in added_cond_kwargs.items()}
        blocks = [*self.unet.down_blocks, *([self.unet.mid_block] if self.unet.mid_block is not None else [])]
        handles = [block.register_forward_hook(keep) for block in blocks[:-1]]
        handles.append(blocks[-1].register_forward_hook(keep_and_stop))
        try:
            self.unet(latents.to(dtype), timestep, encoder_hidden_states.to(dtype), added_cond_kwargs=added_cond_kwargs)
        except _StopForward:
            return [m.float() for m in maps]
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError("the teacher UNet finished without running its last down/mid block")
