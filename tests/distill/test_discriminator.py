"""The ADD / LADD discriminators: frozen feature networks, StyleGAN-T heads, projection conditioning."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import Dinov2Config, Dinov2Model

from turbokit.distill.discriminator import (
    BatchNormLocal,
    Discriminator,
    MinibatchStd,
    TokenHead,
    build_discriminator,
)
from turbokit.distill.feature_networks import DinoFeatures, TeacherFeatures
from turbokit.errors import TurbokitError
from turbokit.tiny import tiny_components

TEXT_DIM = 16
BATCH = 2


def tiny_dino_model() -> Dinov2Model:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56
    )
    return Dinov2Model(config)


@pytest.fixture(scope="module")
def dino() -> DinoFeatures:
    return DinoFeatures(tiny_dino_model(), image_size=56)  # 4×4 = 16 tokens


@pytest.fixture(scope="module")
def unets() -> dict[str, nn.Module]:
    return {family: tiny_components(family)["unet"] for family in ("sd2", "sdxl")}


def teacher_inputs(family: str, batch: int = BATCH) -> dict[str, object]:
    """Noisy latents and the UNet conditioning of the tiny `family` model."""
    torch.manual_seed(1)
    inputs: dict[str, object] = {
        "timestep": torch.tensor([999, 250][:batch]),
        "encoder_hidden_states": torch.randn(batch, 77, 192 if family == "sdxl" else 64),
    }
    if family == "sdxl":
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 128), "time_ids": time_ids}
    return inputs


def images(batch: int = BATCH, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size) * 2 - 1


def test_add_features_and_logits_have_one_entry_per_tapped_layer(dino: DinoFeatures) -> None:
    assert dino.layers == [0, 1, 2, 3, 4]  # patch embedding + 4 evenly spaced blocks
    disc = build_discriminator("add", dino=dino, text_dim=TEXT_DIM)
    x = images()
    features = disc.features(x)
    assert [f.shape for f in features] == [(BATCH, 32, 16)] * 5  # channels first, CLS token removed
    c_img = dino.cls_embedding(x)
    assert c_img.shape == (BATCH, 32) and not c_img.requires_grad
    logits = disc.head_logits(features, torch.randn(BATCH, TEXT_DIM), c_img)
    assert [t.shape for t in logits] == [(BATCH, 16)] * 5
    assert all(torch.isfinite(t).all() for t in logits)


def test_stylegan_t_layers_for_a_12_block_vit() -> None:
    from turbokit.distill.feature_networks import evenly_spaced_layers

    assert evenly_spaced_layers(12) == [0, 3, 6, 9, 12]  # patch embedding + 0-based blocks 2, 5, 8, 11


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_ladd_features_are_down_and_mid_block_maps(unets: dict[str, nn.Module], family: str) -> None:
    disc = build_discriminator("ladd", teacher_unet=unets[family], text_dim=TEXT_DIM)
    inputs = teacher_inputs(family)
    features = disc.features(torch.randn(BATCH, 4, 8, 8), **inputs)
    # tiny UNets: down blocks of 64 and 128 channels (the first halves 8² → 4²), mid block 128
    assert [f.shape for f in features] == [(BATCH, 64, 4, 4), (BATCH, 128, 4, 4), (BATCH, 128, 4, 4)]
    assert disc.feature_network.channels == [64, 128, 128]
    logits = disc.head_logits(features, torch.randn(BATCH, TEXT_DIM), noise_level=inputs["timestep"])
    assert [t.shape for t in logits] == [(BATCH, 16)] * 3


def test_teacher_features_do_not_run_the_up_blocks(unets: dict[str, nn.Module]) -> None:
    unet = unets["sdxl"]
    calls = {"down": 0, "mid": 0, "up": 0}

    def counter(name: str):
        def hook(*_: object) -> None:
            calls[name] += 1

        return hook

    handles = [block.register_forward_hook(counter("down")) for block in unet.down_blocks]
    handles += [block.register_forward_hook(counter("up")) for block in unet.up_blocks]
    handles += [
        unet.mid_block.register_forward_hook(counter("mid")),
        unet.conv_out.register_forward_hook(counter("up")),
    ]
    inputs = teacher_inputs("sdxl")
    TeacherFeatures(unet)(torch.randn(BATCH, 4, 8, 8), **inputs)
    assert calls == {"down": 2, "mid": 1, "up": 0}

    # the hooks are gone afterwards: the same UNet still works as the teacher
    latents, t, context = torch.randn(BATCH, 4, 8, 8), inputs["timestep"], inputs["encoder_hidden_states"]
    out = unet(latents, t, context, added_cond_kwargs=inputs["added_cond_kwargs"]).sample
    for handle in handles:
        handle.remove()
    assert out.shape == (BATCH, 4, 8, 8) and calls["up"] == len(unet.up_blocks) + 1


@pytest.mark.parametrize("method", ["add", "ladd"])
def test_only_heads_train_and_gradient_reaches_the_input(
    dino: DinoFeatures, unets: dict[str, nn.Module], method: str
) -> None:
    if method == "add":
        disc = build_discriminator("add", dino=dino, text_dim=TEXT_DIM)
        x, kwargs = images().requires_grad_(), {"image_embeds": dino.cls_embedding(images())}
    else:
        disc = build_discriminator("ladd", teacher_unet=unets["sd2"], text_dim=TEXT_DIM)
        x, kwargs = torch.randn(BATCH, 4, 8, 8, requires_grad=True), teacher_inputs("sd2")
        kwargs["noise_level"] = kwargs.pop("timestep")  # forward gives t̂ to both the teacher and the heads
    assert not any(p.requires_grad for p in disc.feature_network.parameters())
    heads = {id(p) for p in disc.heads.parameters()}
    assert {id(p) for p in disc.trainable_parameters()} == heads
    assert {id(p) for p in disc.parameters() if p.requires_grad} == heads

    disc.train()
    assert disc.heads.training and not disc.feature_network.training  # F stays in eval mode

    logits = disc(x, torch.randn(BATCH, TEXT_DIM), **kwargs)
    sum(-t.mean() for t in logits).backward()  # the generator's adversarial loss
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.feature_network.parameters())
    assert all(p.grad is not None for p in disc.trainable_parameters())


@pytest.mark.parametrize(
    ("conditioning", "sees_text", "sees_image"),
    [("none", False, False), ("text", True, False), ("image", False, True), ("text+image", True, True)],
)
def test_add_conditioning(dino: DinoFeatures, conditioning: str, sees_text: bool, sees_image: bool) -> None:
    torch.manual_seed(0)
    disc = build_discriminator("add", dino=dino, text_dim=TEXT_DIM, conditioning=conditioning)
    disc.eval()  # in train mode each call takes a spectral-norm power-iteration step, changing the weights
    features = disc.features(images())
    text, image = torch.randn(BATCH, TEXT_DIM), torch.randn(BATCH, 32)
    base = disc.head_logits(features, text, image)
    other_text = disc.head_logits(features, torch.randn(BATCH, TEXT_DIM), image)
    other_image = disc.head_logits(features, text, torch.randn(BATCH, 32))
    assert (not torch.allclose(base[0], other_text[0])) == sees_text
    assert (not torch.allclose(base[0], other_image[0])) == sees_image
    if conditioning == "none":
        assert disc.head_logits(features, None)[0].equal(base[0])


@pytest.mark.parametrize(("conditioning", "sees_text"), [("none", False), ("text", True)])
def test_ladd_conditioning_always_includes_the_noise_level(
    unets: dict[str, nn.Module], conditioning: str, sees_text: bool
) -> None:
    torch.manual_seed(0)
    disc = build_discriminator("ladd", teacher_unet=unets["sd2"], text_dim=TEXT_DIM, conditioning=conditioning)
    disc.eval()
    inputs = teacher_inputs("sd2")
    features = disc.features(torch.randn(BATCH, 4, 8, 8), **inputs)
    text, t = torch.randn(BATCH, TEXT_DIM), inputs["timestep"]
    base = disc.head_logits(features, text, noise_level=t)
    other_text = disc.head_logits(features, torch.randn(BATCH, TEXT_DIM), noise_level=t)
    assert (not torch.allclose(base[0], other_text[0])) == sees_text
    assert not torch.allclose(base[0], disc.head_logits(features, text, noise_level=t.flip(0))[0])
    with pytest.raises(ValueError, match="noise_level"):
        disc.head_logits(features, text)


def test_conditioning_the_method_cannot_provide_is_a_user_error(unets: dict[str, nn.Module]) -> None:
    with pytest.raises(TurbokitError, match="not available for ladd"):
        build_discriminator("ladd", teacher_unet=unets["sd2"], text_dim=TEXT_DIM, conditioning="text+image")
    with pytest.raises(TurbokitError, match="unknown distillation method"):
        build_discriminator("gan", text_dim=TEXT_DIM)


@pytest.mark.parametrize("batch", [1, 3, 9, 13])
def test_virtual_batch_norm_takes_any_batch_size(batch: int) -> None:
    torch.manual_seed(0)
    norm = BatchNormLocal(4, virtual_batch=8)
    x = torch.randn(batch, 4, 10) * 3 + 5
    y = norm(x)
    assert y.shape == x.shape
    groups = y.tensor_split(-(-batch // 8))  # ⌈B / 8⌉ nearly equal virtual batches
    for g in groups:  # normalised per channel within each virtual batch
        assert torch.allclose(g.mean((0, 2)), torch.zeros(4), atol=1e-5)
        assert torch.allclose(g.var((0, 2), unbiased=False), torch.ones(4), atol=1e-3)
    if len(groups) > 1:  # a sample only influences its own virtual batch
        x2 = x.clone()
        x2[-1] += 1
        assert torch.equal(norm(x2)[: len(groups[0])], y[: len(groups[0])])
    head = TokenHead(8, c_dim=TEXT_DIM)
    assert head(torch.randn(batch, 8, 16), torch.randn(batch, TEXT_DIM)).shape == (batch, 16)


@pytest.mark.parametrize("batch", [1, 3, 4, 9])
def test_minibatch_std_measures_each_groups_spread(batch: int) -> None:
    torch.manual_seed(0)
    layer = MinibatchStd(4)
    x = torch.randn(1, 5, 7).repeat(batch, 1, 1)  # a collapsed batch: every sample the same
    y = layer(x)
    assert y.shape == (batch, 6, 7) and torch.equal(y[:, :5], x)
    assert y[:, 5].abs().max() < 1e-3
    spread = torch.randn(batch, 5, 7) * 2
    groups = spread.tensor_split(-(-batch // 4))  # ⌈B / 4⌉ nearly equal groups
    expected = torch.cat([g.std(0, unbiased=False).mean().expand(len(g), 7) for g in groups])
    assert torch.allclose(layer(spread)[:, 5], expected, atol=1e-3)


def test_a_minibatch_std_head_sees_variety_that_batch_norm_hides() -> None:
    """After the per-group batch norm a collapsed group still has unit variance per channel (over positions),
    but the std channel the output conv reads is ~0 for it and large for a varied group."""
    torch.manual_seed(0)
    head = TokenHead(8, c_dim=0, minibatch_std=4)
    assert head.out.in_channels == 9
    seen = []
    head.out.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, 8, 0]))
    varied = torch.randn(8, 8, 16)
    collapsed = varied[:1].repeat(8, 1, 1) + 1e-4 * torch.randn(8, 8, 16)
    head(varied), head(collapsed)
    normalised = head.main[0][:2](collapsed)  # the first conv and its batch norm
    assert torch.allclose(normalised.var((0, 2), unbiased=False), torch.ones(8), atol=1e-2)
    assert seen[0].min() > 0.3 and seen[1].max() < 0.01


def test_build_discriminator_gives_every_head_the_std_channel(dino: DinoFeatures, unets: dict[str, nn.Module]) -> None:
    for disc in (
        build_discriminator("add", dino=dino, text_dim=TEXT_DIM, minibatch_std=2),
        build_discriminator("ladd", teacher_unet=unets["sd2"], text_dim=TEXT_DIM, minibatch_std=2),
    ):
        assert all(isinstance(head.main[-1], MinibatchStd) and head.main[-1].group == 2 for head in disc.heads)
    plain = build_discriminator("add", dino=dino, text_dim=TEXT_DIM)
    assert not any(isinstance(m, MinibatchStd) for m in plain.modules())
    disc = build_discriminator("add", dino=dino, text_dim=TEXT_DIM, conditioning="text", minibatch_std=2)
    logits = disc(images(3), torch.randn(3, TEXT_DIM))
    assert [t.shape[0] for t in logits] == [3] * len(disc.heads)


def test_every_head_conv_is_spectrally_normalised(dino: DinoFeatures, unets: dict[str, nn.Module]) -> None:
    for disc in (
        build_discriminator("add", dino=dino, text_dim=TEXT_DIM),
        build_discriminator("ladd", teacher_unet=unets["sd2"], text_dim=TEXT_DIM),
    ):
        convs = [m for m in disc.heads.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
        assert len(convs) == 3 * len(disc.heads)
        assert all(parametrize.is_parametrized(conv, "weight") for conv in convs)


def test_r1_penalty_on_head_inputs_backpropagates(dino: DinoFeatures) -> None:
    disc: Discriminator = build_discriminator("add", dino=dino, text_dim=TEXT_DIM, conditioning="text")
    with torch.no_grad():
        features = disc.features(images())
    features = [f.requires_grad_() for f in features]
    logits = disc.head_logits(features, torch.randn(BATCH, TEXT_DIM))
    grads = torch.autograd.grad(sum(t.sum() for t in logits), features, create_graph=True)
    sum(g.square().sum() for g in grads).backward()
    # every head parameter but the logit bias shapes the gradient with respect to the head input
    without_grad = [name for name, p in disc.heads.named_parameters() if p.grad is None]
    assert without_grad == [f"{k}.out.bias" for k in range(len(disc.heads))]


def test_dino_from_pretrained_loads_a_local_folder(tmp_path) -> None:
    tiny_dino_model().save_pretrained(tmp_path / "dino")
    dino = DinoFeatures.from_pretrained(tmp_path / "dino", image_size=56)
    assert dino.channels == [32] * 5 and not any(p.requires_grad for p in dino.parameters())


def test_dino_from_pretrained_explains_a_missing_or_wrong_folder(tmp_path) -> None:
    with pytest.raises(TurbokitError, match="--dino_model PATH to a local facebook/dinov2-small folder"):
        DinoFeatures.from_pretrained(tmp_path / "missing")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(TurbokitError, match=r"not DINOv2.*--dino_model"):
        DinoFeatures.from_pretrained(tmp_path / "clip")
