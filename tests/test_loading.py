"""Finding models: diffusers folders of each family, hub ids offline, pickle refusal, tiny decoders."""

from __future__ import annotations

import shutil

import pytest
import torch

from turbokit import TurboPipeline
from turbokit.errors import ModelNotFoundError, TurbokitError
from turbokit.loading import family_of, load_model, load_tiny_vae

F32 = dict(allow_pickle=False, dtype=torch.float32, vae_dtype=torch.float32)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_folders_load_with_their_family(tiny_models, family):
    loaded = load_model(tiny_models[family], **F32)
    assert loaded.family == family
    expected = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if family == "sdxl":
        expected |= {"text_encoder_2", "tokenizer_2"}
    assert set(loaded.components) == expected
    # The pad token decides what cross-attention sees after the prompt; it must be the family's.
    assert loaded.components["tokenizer"].pad_token == ("!" if family == "sd2" else "<|endoftext|>")


def test_family_from_unet_config():
    assert family_of({"addition_embed_type": "text_time", "cross_attention_dim": 2048}) == "sdxl"
    assert family_of({"cross_attention_dim": 768, "use_linear_projection": False}) == "sd1"
    assert family_of({"cross_attention_dim": 1024, "use_linear_projection": True}) == "sd2"


def test_fp16_variant_only_folder_loads(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["sd2"], tmp_path / "variant")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    assert load_model(folder, **F32).family == "sd2"


def test_pickle_only_folder_is_refused_unless_allowed(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["sd2"], tmp_path / "pickled")
    unet_dir = folder / "unet"
    state = load_model(tiny_models["sd2"], **F32).components["unet"].state_dict()
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(TurbokitError, match="arbitrary code"):
        load_model(folder, **F32)
    assert load_model(folder, **{**F32, "allow_pickle": True}).family == "sd2"


def test_sharded_folder_loads_without_a_bar_when_bars_are_off(tiny_models, tmp_path, monkeypatch, capfd):
    from diffusers.utils import logging as diffusers_logging

    folder = shutil.copytree(tiny_models["sd1"], tmp_path / "sharded")
    unet = load_model(folder, **F32).components["unet"]
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", max_shard_size="100KB")
    assert len(list((folder / "unet").glob("*.safetensors"))) > 1
    capfd.readouterr()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what the CLI sets
    bars_were_on = diffusers_logging.is_progress_bar_enabled()
    try:
        load_model(folder, **F32)
    finally:  # the setting is process-wide: leave it as the test found it
        if bars_were_on:
            diffusers_logging.enable_progress_bar()
    assert "Loading checkpoint shards" not in capfd.readouterr().err


def test_hub_id_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not available locally") as err:
        load_model("stabilityai/sd-turbo", **F32)
    assert "-m" in str(err.value)


@pytest.mark.parametrize("name", ["/no/such/dir", "./relative/missing", "not a model"])
def test_missing_paths_are_user_errors(name):
    with pytest.raises(ModelNotFoundError, match="model not found"):
        load_model(name, **F32)


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model_index\.json"):
        load_model(tmp_path, **F32)


def test_tiny_vae_path_is_checked(tiny_models, tmp_path):
    with pytest.raises(ModelNotFoundError, match="AutoencoderTiny"):
        load_tiny_vae(tmp_path, torch.float32)
    with pytest.raises(ModelNotFoundError, match="expected an AutoencoderTiny"):
        load_tiny_vae(tiny_models["sd2"] / "vae", torch.float32)


def test_pipeline_loads_each_family_in_the_requested_dtype(tiny_models):
    pipe = TurboPipeline.from_pretrained(tiny_models["sdxl"], device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16 and all(e.dtype == torch.bfloat16 for e in pipe.text_encoders)
