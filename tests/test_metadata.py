from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.metadata import GenerationParameters, read_parameters, save_png


def _params(**changes: object) -> GenerationParameters:
    base = GenerationParameters(
        "a photo of a cat",
        steps=1,
        seed=42,
        width=512,
        height=512,
        model="sd_turbo",
        sampler="Euler a",
    )
    return dataclasses.replace(base, **changes)


def test_infotext_layout_matches_a1111() -> None:
    text = _params(negative_prompt="blurry", strength=0.5).to_infotext()
    prompt, negative, pairs = text.split("\n")
    assert prompt == "a photo of a cat"
    assert negative == "Negative prompt: blurry"
    assert pairs.startswith(
        "Steps: 1, Sampler: Euler a, Schedule type: Automatic, CFG scale: 0, Seed: 42, Size: 512x512, "
        "Model: sd_turbo, Denoising strength: 0.5, Version: turbokit"
    )


def test_infotext_without_negative_or_strength() -> None:
    text = _params().to_infotext()
    assert "Negative prompt" not in text
    assert "Denoising strength" not in text
    assert text.split("\n")[0] == "a photo of a cat"


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"prompt": 'a cat, "quoted", colon: here\nsecond line, more'},
        {"negative_prompt": 'blurry, low quality: bad\n"ugly"'},
        {"strength": 0.5},
        {"strength": 0.3333333333333333, "guidance_scale": 1.5, "sampler": "Euler"},
        {"prompt": "", "negative_prompt": "only negative"},
        {"prompt": "café ☕, 猫"},
        {"model": 'C:\\models\\my "turbo", v2.safetensors'},
        {"model": "stabilityai/sdxl-turbo", "width": 1024, "height": 768, "seed": 2**32 - 1},
    ],
)
def test_infotext_round_trip(changes: dict[str, object]) -> None:
    params = _params(**changes)
    assert GenerationParameters.from_infotext(params.to_infotext()) == params


def test_values_with_commas_colons_or_quotes_are_json_quoted() -> None:
    text = _params(model='a, b: "c"').to_infotext()
    assert 'Model: "a, b: \\"c\\""' in text


def test_parse_a1111_infotext_with_unknown_keys() -> None:
    text = (
        "masterpiece, 1girl, (blue eyes:1.2),\n"
        "standing in a field\n"
        "Negative prompt: (worst quality:1.4), lowres,\n"
        "bad hands\n"
        "Steps: 4, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 965400086, "
        "Size: 768x512, Model hash: abc123, Model: sdxl_turbo_1.0, VAE: x, "
        'Lora hashes: "add_detail: 7c6bad76eb54, lcm: 1f2a", Denoising strength: 0.75, '
        "Clip skip: 2, Hires upscaler: Latent, Version: v1.10.1"
    )
    params = GenerationParameters.from_infotext(text)
    assert params == GenerationParameters(
        "masterpiece, 1girl, (blue eyes:1.2),\nstanding in a field",
        negative_prompt="(worst quality:1.4), lowres,\nbad hands",
        steps=4,
        seed=965400086,
        width=768,
        height=512,
        model="sdxl_turbo_1.0",
        guidance_scale=7.5,
        sampler="Euler a",
        strength=0.75,
    )


def test_parse_crlf_and_defaults() -> None:
    text = "a dog\r\nSteps: 2, Seed: 7, Size: 512x768, Model: sd_turbo\r\n"
    params = GenerationParameters.from_infotext(text)
    assert params == GenerationParameters("a dog", steps=2, seed=7, width=512, height=768, model="sd_turbo")
    assert params.sampler == "Euler"
    assert params.guidance_scale == 0.0
    assert params.strength is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("just a prompt", "no generation parameters"),
        ("a cat\nSeed: 1, Size: 512x512, Model: m", "'Steps'"),
        ("a cat\nSteps: 1, Seed: 1, Size: big, Model: m", "Size"),
        ("a cat\nSteps: many, Seed: 1, Size: 512x512, Model: m", "Steps"),
        ("a cat\nSteps: 1, Seed: 1, Size: 512x512", "'Model'"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(TurbokitError, match=message):
        GenerationParameters.from_infotext(text)


def test_save_png_writes_parameters_chunk(tmp_path: Path) -> None:
    params = _params(prompt='a cat, "quoted"\nline two', negative_prompt="blurry", strength=0.5)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    out = save_png(image, tmp_path / "out.png", params)
    assert out == tmp_path / "out.png"
    with Image.open(out) as loaded:
        assert loaded.format == "PNG"
        assert loaded.text["parameters"] == params.to_infotext()
        assert loaded.convert("RGB").getpixel((0, 0)) == (10, 20, 30)
    assert read_parameters(out) == params
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left behind


def test_save_png_non_latin1_prompt(tmp_path: Path) -> None:
    params = _params(prompt="猫, café ☕")
    out = save_png(Image.new("RGB", (4, 4)), tmp_path / "cat.png", params)
    assert read_parameters(out) == params


def test_save_png_replaces_existing_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.png"
    save_png(Image.new("RGB", (4, 4)), target, _params(seed=1))
    save_png(Image.new("RGB", (4, 4)), target, _params(seed=2))
    params = read_parameters(target)
    assert params is not None and params.seed == 2


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    save_png(Image.new("RGB", (4, 4)), target, _params(seed=1))
    before = target.read_bytes()
    with pytest.raises(TurbokitError, match=r"out\.png"):
        save_png(Image.new("CMYK", (4, 4)), target, _params(seed=2))  # PNG cannot store CMYK
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_save_png_requires_png_suffix(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"\.png"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "out.jpg", _params())


def test_read_parameters_none_without_chunk(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_parameters(path) is None


def test_read_parameters_errors(tmp_path: Path) -> None:
    with pytest.raises(TurbokitError, match=r"missing\.png"):
        read_parameters(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(TurbokitError, match="not an image"):
        read_parameters(junk)
