"""A warm `--compile openvino` launch runs its converted models without diffusers, and makes the same images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from turbokit.converted import Converted, ConvertedVae, Schedule
from turbokit.pipeline import TurboPipeline
from turbokit.tokenizer import FastClipTokenizer

pytest.importorskip("openvino", reason="turbokit[openvino] is part of the dev extra; installed by make test")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_a_warm_launch_uses_stand_ins_and_makes_the_same_images(tiny_models, cache, family):
    model, kwargs = tiny_models[family], dict(steps=2, seed=[0, 1])
    cold = TurboPipeline.from_pretrained(model, dtype="bf16", compile="openvino")
    assert not isinstance(cold.unet, Converted)  # nothing converted yet: diffusers' own classes
    first = cold(["a red circle", "a cat"], **kwargs)
    warm = TurboPipeline.from_pretrained(model, dtype="bf16", compile="openvino")
    assert isinstance(warm.unet, Converted) and isinstance(warm.vae, ConvertedVae)
    assert isinstance(warm.scheduler, Schedule)
    assert len(warm.text_encoders) == (2 if family == "sdxl" else 1)
    tokenizers = [t for t, _ in warm.family.encoders] if family == "sdxl" else [warm.family.tokenizer]
    assert all(isinstance(t, FastClipTokenizer) for t in tokenizers)  # saved by the cold launch, no transformers
    torch.testing.assert_close(warm.alphas_cumprod, cold.alphas_cumprod, rtol=0, atol=0)
    assert warm.default_sampler == cold.default_sampler and warm.native_size == cold.native_size
    again = warm(["a red circle", "a cat"], **kwargs)
    assert torch.equal(again.pixels, first.pixels)
    assert torch.equal(again.latents, first.latents)


def test_a_warm_launch_imports_neither_diffusers_nor_transformers(tiny_models, cache, tmp_path):
    model = tiny_models["sd2"]
    first = TurboPipeline.from_pretrained(model, compile="openvino")("a red circle", seed=3)
    out = tmp_path / "pixels.pt"
    probe = (
        "import sys, torch; from turbokit.pipeline import TurboPipeline; "
        f"pipe = TurboPipeline.from_pretrained({str(model)!r}, compile='openvino'); "
        f"torch.save(pipe('a red circle', seed=3).pixels, {str(out)!r}); "
        "heavy = ('diffusers', 'transformers', 'peft', 'torch._dynamo'); "
        "print(type(pipe.unet).__name__, [m for m in heavy if m in sys.modules])"
    )
    env = {**os.environ, "TURBOKIT_CACHE": str(cache.parent)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "Converted []"
    assert torch.equal(torch.load(out), first.pixels)


def test_image_to_image_on_a_warm_launch_reads_the_real_vae_once(tiny_models, cache):
    model = tiny_models["sd2"]
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    kwargs = dict(image=source, steps=2, strength=0.5, seed=5)
    first = TurboPipeline.from_pretrained(model, compile="openvino")("a red square", **kwargs)
    warm = TurboPipeline.from_pretrained(model, compile="openvino")
    assert isinstance(warm.vae, ConvertedVae)
    again = warm("a red square", **kwargs)
    assert warm.vae.load_full.cache_info().currsize == 1
    warm("a blue square", **kwargs)
    assert warm.vae.load_full.cache_info().hits == 1  # loaded once
    assert torch.equal(again.pixels, first.pixels)


def test_the_full_load_when_a_stand_in_would_lack_something(tiny_models, cache, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["sd2"], model)
    TurboPipeline.from_pretrained(model, compile="openvino")("a red circle", seed=0)
    assert isinstance(TurboPipeline.from_pretrained(model, compile="openvino").unet, Converted)

    for saved in (cache / "tokenizers").glob("*.json"):  # a cached tokenizer it cannot read: the folder's own
        saved.write_text("{not json")
    warm = TurboPipeline.from_pretrained(model, compile="openvino")
    assert isinstance(warm.unet, Converted) and type(warm.family.tokenizer).__name__ == "CLIPTokenizer"

    shutil.rmtree(cache / "schedules")  # no cached schedule: diffusers computes it (and caches it again)
    assert not isinstance(TurboPipeline.from_pretrained(model, compile="openvino").unet, Converted)
    assert isinstance(TurboPipeline.from_pretrained(model, compile="openvino").unet, Converted)

    config = json.loads((model / "text_encoder" / "config.json").read_text())  # a changed text encoder: not
    (model / "text_encoder" / "config.json").write_text(json.dumps(config | {"layer_norm_eps": 1e-6}))  # converted
    pipe = TurboPipeline.from_pretrained(model, compile="openvino")
    assert not isinstance(pipe.text_encoders[0], Converted)
    pipe("a red circle", seed=0)  # converts it
    assert isinstance(TurboPipeline.from_pretrained(model, compile="openvino").text_encoders[0], Converted)

    eager = TurboPipeline.from_pretrained(model)  # without --compile openvino nothing changes
    assert not isinstance(eager.unet, Converted) and not isinstance(eager.scheduler, Schedule)


def test_a_saved_tokenizer_is_keyed_on_its_files_and_transformers_version(tiny_models, tmp_path, monkeypatch):
    from turbokit import converted

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_models["sd2"] / "tokenizer", folder)
    key = converted._tokenizer_file(tmp_path, folder)
    assert converted._tokenizer_file(tmp_path, folder) == key
    (folder / "special_tokens_map.json").write_text("{}")
    assert converted._tokenizer_file(tmp_path, folder) != key  # another file: another tokenizer
    edited = converted._tokenizer_file(tmp_path, folder)
    monkeypatch.setattr(converted, "_transformers_version", lambda: "99.0.0")
    assert converted._tokenizer_file(tmp_path, folder) != edited  # another transformers may build another one
