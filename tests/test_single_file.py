"""Single-file checkpoints in Stability's original layout: save, detect, infer configs, load."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from diffusers.schedulers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from turbokit.configs import turbo_config_dir
from turbokit.errors import TurbokitError
from turbokit.original_layout import to_original_layout
from turbokit.single_file import detect_family, infer_configs, load_single_file, read_state_dict, save_single_file
from turbokit.tiny import tiny_components

FAMILIES = ("sd1", "sd2", "sdxl")
TEXT_ENCODERS = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP contention makes
    # each tiny UNet call take a second instead of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, object], Path]]:
    """Per family: the tiny components and the single file they were saved to."""
    root = tmp_path_factory.mktemp("single-files")
    out = {}
    for family in FAMILIES:
        components = tiny_components(family, seed=0)
        out[family] = components, save_single_file(components, family, root / f"{family}.safetensors")
    return out


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key].to(sa[key].dtype)), key


def _token_ids(components: dict[str, object], name: str) -> torch.Tensor:
    tokenizer = components["tokenizer_2" if name == "text_encoder_2" else "tokenizer"]
    return tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids


def _unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(1, config.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=gen)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, pooled, generator=gen),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
            }
        }
    with torch.no_grad():
        return unet(sample, 999, encoder_hidden_states=context, **extra).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip(saved: dict, family: str) -> None:
    original, path = saved[family]
    state_dict, metadata = read_state_dict(path)
    assert metadata["format"] == "pt" and metadata["turbokit.family"] == family
    assert detect_family(state_dict) == family

    loaded_family, loaded = load_single_file(path)
    assert loaded_family == family
    expected = {"unet", "vae", "scheduler", *TEXT_ENCODERS[family]}
    expected |= {"tokenizer", "tokenizer_2"} if family == "sdxl" else {"tokenizer"}
    assert set(loaded) == expected
    for name in ["unet", "vae", *TEXT_ENCODERS[family]]:
        _assert_same_weights(original[name], loaded[name])

    torch.testing.assert_close(_unet_output(loaded["unet"]), _unet_output(original["unet"]), atol=1e-5, rtol=0)
    for name in TEXT_ENCODERS[family]:
        ids = _token_ids(loaded, name)
        with torch.no_grad():
            ours, theirs = loaded[name](ids), original[name](ids)
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    assert loaded["tokenizer"].pad_token == ("!" if family == "sd2" else "<|endoftext|>")

    scheduler = loaded["scheduler"]
    assert type(scheduler) is (EulerAncestralDiscreteScheduler if family == "sdxl" else EulerDiscreteScheduler)
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.prediction_type == "epsilon"
    assert loaded["unet"].config.sample_size == original["unet"].config.sample_size  # from the file's metadata


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_from_single_file_reads_our_file(saved: dict, tiny_models: dict[str, Path], family: str) -> None:
    original, path = saved[family]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_single_file(str(path), config=str(tiny_models[family]), local_files_only=True, **extra)
    for name in ["unet", "vae", *TEXT_ENCODERS[family]]:
        _assert_same_weights(original[name], getattr(pipe, name))


def test_save_writes_atomically_and_casts(saved: dict, tmp_path: Path) -> None:
    components, _ = saved["sd2"]
    path = save_single_file(components, "sd2", tmp_path / "half.safetensors", dtype=torch.float16)
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]  # no temporary left behind
    tensors = load_file(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    family, loaded = load_single_file(path, torch_dtype=None)
    assert family == "sd2" and loaded["unet"].dtype == torch.float16


def test_save_refuses_mismatched_family(saved: dict, tmp_path: Path) -> None:
    components, _ = saved["sd1"]  # OpenAI CLIP (quick_gelu) cannot be written where SD 2.x keeps OpenCLIP
    with pytest.raises(TurbokitError, match="wrong family"):
        save_single_file(components, "sd2", tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# --- full-size architectures on the meta device -------------------------------------------------


def _config(family: str, part: str) -> dict:
    return json.loads((turbo_config_dir(family) / part / "config.json").read_text())


def _full_size(family: str) -> dict[str, dict]:
    """Released configs: sd-turbo (SD 2.1), sdxl-turbo, and SD 1.5 (sd-turbo's UNet with SD 1.x's differences)."""
    if family == "sd1":
        unet = {**_config("sd2", "unet"), "attention_head_dim": 8, "cross_attention_dim": 768}
        unet["use_linear_projection"] = False
        return {"unet": unet, "vae": _config("sd2", "vae"), "text_encoder": _config("sdxl", "text_encoder")}
    configs = {part: _config(family, part) for part in ("unet", "vae", "text_encoder")}
    if family == "sdxl":
        configs["text_encoder_2"] = _config(family, "text_encoder_2")
    return configs


UNET_FIELDS = (
    "block_out_channels", "layers_per_block", "attention_head_dim", "transformer_layers_per_block",
    "cross_attention_dim", "down_block_types", "up_block_types", "mid_block_type", "use_linear_projection",
    "in_channels", "out_channels", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "sample_size",
)  # fmt: skip
VAE_FIELDS = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
              "scaling_factor")  # fmt: skip
TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings", "hidden_act")  # fmt: skip


@pytest.mark.parametrize(("family", "diffusers_type"), [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_inferred_full_size_configs_match_released(family: str, diffusers_type: str) -> None:
    configs = _full_size(family)
    with torch.device("meta"):  # shapes only: no memory, no time
        state_dicts = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]).state_dict(),
            "vae": AutoencoderKL.from_config(configs["vae"]).state_dict(),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).state_dict(),
        }
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
            state_dicts["text_encoder_2"] = te2.state_dict()
    original = to_original_layout(state_dicts, family)
    assert detect_family(original) == family
    assert infer_diffusers_model_type(original) == diffusers_type  # diffusers recognises the layout

    inferred = infer_configs(original, family)
    for part, fields in [("unet", UNET_FIELDS), ("vae", VAE_FIELDS)]:
        for field in fields:
            assert inferred[part].get(field) == configs[part].get(field), (part, field)
    for part in TEXT_ENCODERS[family]:
        for field in TEXT_FIELDS:
            assert inferred[part][field] == configs[part][field], (part, field)
    if family == "sdxl":
        assert inferred["text_encoder_2"]["projection_dim"] == 1280
    assert inferred["scheduler"]["timestep_spacing"] == "trailing"

    # Spot checks against the released files' keys and shapes.
    expected_shapes = {
        "sd1": {"cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
                "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1)},
        "sd2": {"cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
                "cond_stage_model.model.text_projection": (1024, 1024),
                "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                "first_stage_model.decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
                "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1)},
        "sdxl": {"conditioner.embedders.1.model.text_projection": (1280, 1280),
                 "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                 "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                 "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                 "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3)},
    }  # fmt: skip
    for key, shape in expected_shapes[family].items():
        assert tuple(original[key].shape) == shape, key


# --- OpenCLIP semantics against an independent reference -----------------------------------------


class _RefBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (the module names give the original keys); MLP ratio 2 as in tiny models."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, 2 * width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(2 * width, width))]
            )
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _RefOpenCLIP(nn.Module):
    """open_clip's text tower, run as Stability's SD 2.x / SDXL code runs it."""

    def __init__(self, width: int, layers: int, heads: int, proj_dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(49408, width)
        self.positional_embedding = nn.Parameter(torch.empty(77, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_RefBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, proj_dim))
        for name, p in self.named_parameters():  # random everything, biases and norms included
            nn.init.normal_(p, mean=1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")) else 0.0,
                            std=0.02 if "embedding" in name else 1 / math.sqrt(width))  # fmt: skip

    def layer_outputs(self, ids: torch.Tensor) -> list[torch.Tensor]:
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((77, 77), float("-inf")).triu(1)
        outputs = []
        for block in self.transformer.resblocks:
            x = block(x, mask)
            outputs.append(x)
        return outputs


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_open_clip_matches_original_code(
    saved: dict, tiny_models: dict[str, Path], tmp_path: Path, family: str
) -> None:
    """A file with OpenCLIP weights (and, as released SD 2.x files, one block more than SD 2.x uses)
    gives the embeddings that Stability's code computes, in turbokit and in diffusers alone."""
    torch.manual_seed(1)
    prefix = "cond_stage_model.model." if family == "sd2" else "conditioner.embedders.1.model."
    width, heads = (64, 1) if family == "sd2" else (128, 2)  # the tiny UNets' widths
    # The tiny encoders have 2 layers; an SD 2.x file holds one more (unused), an SDXL file exactly as many.
    ref = _RefOpenCLIP(width, layers=3 if family == "sd2" else 2, heads=heads, proj_dim=width).eval()
    tensors = {k: v for k, v in read_state_dict(saved[family][1])[0].items() if not k.startswith(prefix)}
    tensors.update({prefix + k: v.detach().clone() for k, v in ref.state_dict().items()})
    path = tmp_path / "openclip.safetensors"
    save_file(tensors, str(path))

    _, loaded = load_single_file(path)
    name = "text_encoder" if family == "sd2" else "text_encoder_2"
    ids = _token_ids(loaded, name)
    pipe_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = pipe_cls.from_single_file(str(path), config=str(tiny_models[family]), local_files_only=True, **extra)
    with torch.no_grad():
        outputs = ref.layer_outputs(ids)
        if family == "sd2":
            # ldm FrozenOpenCLIPEmbedder(layer="penultimate"): stop before the last block, then ln_final.
            expected = ref.ln_final(outputs[-2])
            assert loaded[name].config.num_hidden_layers == 2
            for encoder in (loaded[name], pipe.text_encoder):  # the SD pipeline uses last_hidden_state
                torch.testing.assert_close(encoder(ids).last_hidden_state, expected, atol=1e-5, rtol=0)
        else:
            # sgm FrozenOpenCLIPEmbedder2: penultimate block without ln_final; pooled from the last, projected.
            final = ref.ln_final(outputs[-1])
            pooled = final[torch.arange(1), ids.argmax(-1)] @ ref.text_projection
            for encoder in (loaded[name], pipe.text_encoder_2):
                out = encoder(ids, output_hidden_states=True)
                torch.testing.assert_close(out.hidden_states[-2], outputs[-2], atol=1e-5, rtol=0)
                torch.testing.assert_close(out.text_embeds, pooled, atol=1e-5, rtol=0)


# --- bad inputs ----------------------------------------------------------------------------------


def test_pickle_refused_unless_allowed(saved: dict, tmp_path: Path) -> None:
    original, path = saved["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    with pytest.raises(TurbokitError) as refused:
        load_single_file(ckpt)
    message = str(refused.value)
    assert "arbitrary code" in message and ".safetensors" in message and "--allow-pickle" in message

    family, loaded = load_single_file(ckpt, allow_pickle=True)
    assert family == "sd1"
    _assert_same_weights(original["unet"], loaded["unet"])


def test_corrupt_safetensors(saved: dict, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 16)
    truncated = tmp_path / "truncated.safetensors"
    data = saved["sd1"][1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for bad in (garbage, truncated):
        with pytest.raises(TurbokitError, match=r"not a readable \.safetensors file"):
            load_single_file(bad)


def test_not_a_stable_diffusion_file(tmp_path: Path) -> None:
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4)}, str(flux))
    with pytest.raises(TurbokitError, match=r"expected a Stable Diffusion 1\.x, 2\.x or SDXL checkpoint.*Flux"):
        load_single_file(flux)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(TurbokitError, match="expected a Stable Diffusion"):
        load_single_file(other)
    with pytest.raises(TurbokitError, match="no text encoder"):
        detect_family(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"])
    with pytest.raises(TurbokitError, match="not found"):
        load_single_file(tmp_path / "missing.safetensors")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(TurbokitError, match=r"expected \.safetensors"):
        load_single_file(gguf)
