"""Recipe stage `text`: a small CLIP trained on `shapes` — the text encoder of the models, and a ViT for ADD.

Text tower: transformers' `CLIPTextModel` (64 wide, 4 layers) with the real CLIP BPE tokenizer built offline
(`turbokit.tokenizer`), so the models it conditions are ordinary SD 2.x pipelines. Image tower:
transformers' `Dinov2Model` (a ViT-S-like layout at 64 pixels, patch 8). Both are trained with CLIP's
symmetric contrastive loss on caption–image pairs of the `train` split (held-out pairs never seen), with
hard-negative captions — the true caption with one attribute changed — as extra wrong answers for each image.

The image tower stands in for DINOv2 in the `add` discriminator of the distillation stage: ADD needs a
frozen, pretrained ViT, and none can be downloaded here. It is saved as a DINOv2 folder that
`turbokit distill --dino_model` loads; the images it sees are normalised as DINOv2's are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

from turbokit.compat import save_pretrained
from turbokit.distill.feature_networks import IMAGENET_MEAN, IMAGENET_STD
from turbokit.recipes.shapes import NEGATIVE_KINDS, example, false_caption
from turbokit.recipes.training import StageRun, finished, set_lr, shapes_batch, warmup_cosine
from turbokit.tokenizer import PAD_OPENCLIP, clip_tokenizer

TEXT_WIDTH = 64
NEGATIVES_PER_IMAGE = 2  # hard-negative captions per image in training (`hard_negatives`)
EMBED_DIM = 64


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=4,
            num_attention_heads=2,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act="gelu",
            projection_dim=EMBED_DIM,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )


def build_vision(size: int = 64) -> Dinov2Model:
    return Dinov2Model(
        Dinov2Config(
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=3,
            mlp_ratio=4,
            image_size=size,
            patch_size=8,
            layerscale_value=1.0,
        )
    )


class ShapesCLIP(nn.Module):
    """The two towers, their projections into a shared space, and CLIP's learned temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.text = build_text_encoder()
        self.vision = build_vision()
        self.text_projection = nn.Linear(TEXT_WIDTH, EMBED_DIM, bias=False)
        self.vision_projection = nn.Linear(self.vision.config.hidden_size, EMBED_DIM, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), as CLIP starts
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(input_ids).pooler_output), dim=-1)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` in [-1, 1], normalised as `DinoFeatures` does for the discriminator."""
        values = ((pixels + 1) / 2 - self.mean) / self.std
        return F.normalize(self.vision_projection(self.vision(values).pooler_output), dim=-1)

    def loss(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, negative_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's symmetric cross-entropy, and the image→text retrieval accuracy within the batch. `negative_ids`:
        hard-negative captions, extra wrong answers for every image (the text→image direction has none)."""
        images, scale = self.embed_images(pixels), self.logit_scale.exp().clamp(max=100)
        logits = scale * images @ self.embed_text(input_ids).T
        to_text = logits
        if negative_ids is not None:
            to_text = torch.cat([logits, scale * images @ self.embed_text(negative_ids).T], 1)
        labels = torch.arange(len(logits))
        loss = (F.cross_entropy(to_text, labels) + F.cross_entropy(logits.T, labels)) / 2
        return loss, (to_text.argmax(1) == labels).float().mean()


def hard_negatives(split: str, step: int, batch_size: int, seed: int, per_image: int) -> tuple[list[str], list[str]]:
    """`per_image` false captions (`shapes.false_caption`) of each scene of `shapes_batch(split, step, batch_size,
    seed=seed)`, image by image, and the kind of each (a caption that offers no change gives none)."""
    rng = np.random.default_rng((seed, step, 7))
    captions, kinds = [], []
    for index in range(step * batch_size, (step + 1) * batch_size):
        scene, text = example(split, index, seed)
        for _ in range(per_image):
            if negative := false_caption(scene, text, rng):
                captions.append(negative[0])
                kinds.append(negative[1])
    return captions, kinds


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the longest caption: the causal text tower's EOS state does not depend on the
    padding after it, so training on short sequences matches the pipelines' 77-token inputs."""
    return tokenizer(captions, padding="longest", truncation=True, max_length=77, return_tensors="pt").input_ids


def train_clip(
    folder: str | Path,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> ShapesCLIP:
    """Train (or resume, or load a finished) CLIP in `folder`; writes `text_encoder/`, `tokenizer/` (diffusers
    pipeline layout) and `dino/` (a DINOv2 folder for `turbokit distill --dino_model`)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model = ShapesCLIP()
    if finished(folder):
        model.text = CLIPTextModel.from_pretrained(folder / "text_encoder")
        model.vision = Dinov2Model.from_pretrained(folder / "dino")
        return model.eval()
    tokenizer = clip_tokenizer(PAD_OPENCLIP)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    run = StageRun(folder, {"clip": model}, optimizer, steps, label="text")
    run.resume()
    model.train()
    for step in run.steps(progress=progress):
        set_lr(optimizer, lr, warmup_cosine(step, steps, 100))
        pixels, captions = shapes_batch("train", step, batch_size, seed=seed + 1)
        negatives, _ = hard_negatives("train", step, batch_size, seed + 1, NEGATIVES_PER_IMAGE)
        loss, accuracy = model.loss(pixels, tokenize(tokenizer, captions), tokenize(tokenizer, negatives))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        run.log(loss=loss.item(), accuracy=accuracy.item())
    model.eval()
    pixels, captions = shapes_batch("test", 0, batch_size, seed=seed)
    with torch.no_grad():
        _, test_accuracy = model.loss(pixels, tokenize(tokenizer, captions))
    save_pretrained(model.text, folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    model.vision.save_pretrained(folder / "dino")
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "negatives_per_image": NEGATIVES_PER_IMAGE,
        f"test_retrieval_top1_of_{batch_size}": float(test_accuracy),
        "test_true_over_false_caption": hard_negative_accuracy(model, tokenizer, 512, seed),
    }
    run.finish(summary)
    return model


@torch.no_grad()
def hard_negative_accuracy(model: ShapesCLIP, tokenizer: CLIPTokenizer, count: int, seed: int = 0) -> dict[str, float]:
    """How often a test image is closer to its caption than to a false caption of it, per kind of change
    (chance 0.5): whether the encoders read shape, position, binding... rather than a bag of words."""
    pixels, captions = shapes_batch("test", 0, count, seed=seed)
    rng, wins = np.random.default_rng((seed, 11)), {kind: [] for kind in NEGATIVE_KINDS}
    negatives = [false_caption(*example("test", index, seed), rng) for index in range(count)]
    keep = [i for i, negative in enumerate(negatives) if negative]
    images = model.embed_images(pixels[keep])
    right = (images * model.embed_text(tokenize(tokenizer, [captions[i] for i in keep]))).sum(1)
    wrong = (images * model.embed_text(tokenize(tokenizer, [negatives[i][0] for i in keep]))).sum(1)
    for i, won in zip(keep, (right > wrong).tolist(), strict=True):
        wins[negatives[i][1]].append(won)
    return {kind: round(sum(w) / len(w), 3) for kind, w in wins.items() if w}
