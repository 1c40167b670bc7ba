from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.images import fit_size, load_image, pil_to_tensor, resize, tensor_to_pil


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height, with no pixel data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array)


# --- load_image: errors -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TurbokitError, match=r"missing\.png.*not found"):
        load_image(tmp_path / "missing.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(TurbokitError, match="directory"):
        load_image(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(TurbokitError, match=r"empty\.png.*not an image"):
        load_image(path)


def test_text_file_renamed_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(TurbokitError, match=r"notes\.png.*not an image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"cut.{fmt.lower()}"
    _noise(128, 128).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TurbokitError, match=rf"cut\.{fmt.lower()}.*(corrupt|truncated|not an image)"):
        load_image(path)


def test_over_pixel_limit(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "bomb.png", 10_000, 10_000)  # 100 Mpx > 64 Mpx default
    with pytest.raises(TurbokitError, match=r"bomb\.png.*10000x10000.*limit"):
        load_image(path)


def test_over_pillow_bomb_limit(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "huge.png", 100_000, 100_000)  # Pillow itself refuses this
    with pytest.raises(TurbokitError, match=r"huge\.png.*too large"):
        load_image(path)


def test_max_pixels_parameter(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(path)
    with pytest.raises(TurbokitError, match="limit"):
        load_image(path, max_pixels=199)
    assert load_image(path, max_pixels=200).size == (20, 10)


def test_error_message_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    _noise(64, 64).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(TurbokitError) as info:
        load_image(path)
    assert "\n" not in str(info.value)


# --- load_image: conversions --------------------------------------------------------------------


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (4, 1))
    image.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128), (0, 0, 255, 255)])
    path = tmp_path / "alpha.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 0, 0)
    assert loaded.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in loaded.getpixel((2, 0)))
    assert loaded.getpixel((3, 0)) == (0, 0, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putdata([0, 1])
    path = tmp_path / "pal.png"
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 255, 0)


def test_greyscale_and_16_bit(tmp_path: Path) -> None:
    Image.new("L", (2, 2), 77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (77, 77, 77)

    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    sixteen.save(tmp_path / "grey16.png")
    loaded = load_image(tmp_path / "grey16.png")
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path, quality=95)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert all(c >= 250 for c in loaded.getpixel((4, 4)))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF"])
def test_other_formats(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"img.{fmt.lower()}"
    Image.new("RGB", (16, 8), (200, 100, 50)).save(path, format=fmt)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.size == (16, 8)
    assert all(abs(a - b) <= 4 for a, b in zip(loaded.getpixel((8, 4)), (200, 100, 50), strict=True))


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 0, 0)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path) -> None:
    # Stored landscape: left half red, right half blue. Orientation 6 means "rotate 90° clockwise
    # to display", so upright it is portrait with red on top and blue at the bottom.
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)

    loaded = load_image(path)
    assert loaded.size == (32, 64)
    top = np.asarray(loaded)[:28].reshape(-1, 3).mean(axis=0)
    bottom = np.asarray(loaded)[36:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_loaded_image_is_detached_from_file(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    loaded = load_image(path)
    path.unlink()
    assert loaded.getpixel((0, 0)) == (1, 2, 3)


# --- fit_size -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "area"),
    [
        (1024, 768, 512 * 512),
        (768, 1024, 512 * 512),
        (4000, 3000, 1024 * 1024),
        (1920, 1080, 512 * 512),
        (512, 512, 512 * 512),
        (100, 3000, 512 * 512),
        (333, 777, 1024 * 1024),
    ],
)
def test_fit_size_properties(width: int, height: int, area: int) -> None:
    w, h = fit_size(width, height, area)
    assert w % 8 == 0 and h % 8 == 0
    assert abs(w * h - area) / area < 0.10
    # Aspect ratio preserved to within one rounding step on either side.
    assert abs(w - h * width / height) <= 8 * (1 + width / height)


def test_fit_size_examples() -> None:
    assert fit_size(1024, 768, 512 * 512) == (592, 440)
    assert fit_size(512, 512, 512 * 512) == (512, 512)
    assert fit_size(256, 256, 512 * 512) == (512, 512)
    assert fit_size(1920, 1080, 1024 * 1024, multiple=64) == (1344, 768)


def test_fit_size_minimum_side() -> None:
    # A very thin input keeps its short side at one `multiple` rather than rounding it to zero.
    assert fit_size(10_000, 1, 512 * 512) == (51200, 8)
    assert fit_size(1, 10_000, 64 * 64, multiple=16) == (16, 6400)


def test_fit_size_rejects_non_positive() -> None:
    with pytest.raises(InvalidRequestError):
        fit_size(0, 512, 512 * 512)
    with pytest.raises(InvalidRequestError):
        fit_size(512, 512, 0)


# --- resize -------------------------------------------------------------------------------------


def test_resize() -> None:
    image = _noise(64, 48)
    assert resize(image, 64, 48) is image
    out = resize(image, 32, 24)
    assert out.size == (32, 24)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((32, 24), Image.Resampling.LANCZOS)))
    with pytest.raises(InvalidRequestError):
        resize(image, 0, 24)


# --- tensors ------------------------------------------------------------------------------------


def test_pil_to_tensor_shape_and_range() -> None:
    black = Image.new("RGB", (6, 4), (0, 0, 0))
    white = Image.new("RGB", (6, 4), (255, 255, 255))
    tensor = pil_to_tensor([black, white])
    assert tensor.shape == (2, 3, 4, 6)
    assert tensor.dtype == torch.float32
    assert torch.all(tensor[0] == -1.0) and torch.all(tensor[1] == 1.0)


def test_pil_to_tensor_matches_diffusers_normalisation() -> None:
    image = _noise(8, 8)
    expected = np.asarray(image).astype(np.float32) / 255.0 * 2.0 - 1.0
    tensor = pil_to_tensor([image])
    assert np.array_equal(tensor[0].permute(1, 2, 0).numpy(), expected)


def test_pil_to_tensor_converts_mode() -> None:
    tensor = pil_to_tensor([Image.new("L", (2, 2), 255)])
    assert tensor.shape == (1, 3, 2, 2)
    assert torch.all(tensor == 1.0)


def test_pil_to_tensor_errors() -> None:
    with pytest.raises(ValueError):
        pil_to_tensor([])
    with pytest.raises(ValueError, match="one size"):
        pil_to_tensor([Image.new("RGB", (2, 2)), Image.new("RGB", (3, 2))])


def test_tensor_round_trip_exact_for_uint8() -> None:
    images = [_noise(16, 12, seed=i) for i in range(3)]
    everything = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    for batch in (images, [everything]):
        tensor = pil_to_tensor(batch)
        back = tensor_to_pil((tensor + 1.0) / 2.0)
        assert [im.mode for im in back] == ["RGB"] * len(batch)
        for original, restored in zip(batch, back, strict=True):
            assert np.array_equal(np.asarray(original), np.asarray(restored))


def test_tensor_to_pil_clamps_and_rounds() -> None:
    t = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0, 0.5 / 255, float("nan")]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    (image,) = tensor_to_pil(t)
    assert [image.getpixel((x, 0))[0] for x in range(7)] == [0, 0, 128, 255, 255, 0, 0]


def test_tensor_to_pil_half_precision() -> None:
    t = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float16)
    (image,) = tensor_to_pil(t)
    assert image.getpixel((0, 0)) == (128, 128, 128)


def test_tensor_to_pil_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="N, 3, H, W"):
        tensor_to_pil(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(1, 4, 4, 4))
