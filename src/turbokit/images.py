"""Input images from users, and conversion between PIL images and the tensors the models use."""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from turbokit.errors import InvalidRequestError, TurbokitError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""64 megapixels (8192x8192): larger inputs are refused before they are decoded."""

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# What Pillow raises on corrupt or truncated data varies by format plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError)


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open any image Pillow reads (first frame if animated), upright per EXIF, as RGB.

    Transparency is composited onto white. Raises TurbokitError naming the file if it is missing,
    not an image, corrupt or truncated, or larger than `max_pixels`.
    """
    path = Path(path)
    if path.is_dir():
        raise TurbokitError(f"cannot load image {path}: it is a directory, not an image file")
    if not path.exists():
        raise TurbokitError(f"cannot load image {path}: file not found")
    try:
        return open_image(path, name=str(path), max_pixels=max_pixels)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise TurbokitError(f"cannot load image {path}: {err.strerror or err}") from err


def open_image(
    source: str | Path | BinaryIO,
    *,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode an image file or stream (an upload, a tar member) safely: upright, RGB, first frame.

    The pixel count is read from the header before decoding, so decompression bombs stop there;
    everything is decoded inside, so corruption is reported here and not later. Raises
    InvalidRequestError (a TurbokitError) whose message names `name` and the reason."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source, formats=formats)
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"cannot load image {name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, "
                    f"over the {max_pixels / 1e6:.1f} megapixel limit (too large); downscale it first"
                )
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError as err:
        kinds = f"one of {', '.join(formats)}" if formats else "a format Pillow can read"
        raise InvalidRequestError(f"cannot load image {name}: not an image file, or not {kinds}") from err
    except Image.DecompressionBombError as err:
        raise InvalidRequestError(
            f"cannot load image {name}: over the {max_pixels / 1e6:.1f} megapixel limit (too large to load safely)"
        ) from err
    except _DECODE_ERRORS as err:
        raise InvalidRequestError(f"cannot load image {name}: corrupt or truncated image ({_one_line(err)})") from err


def fit_size(width: int, height: int, target_area: int, multiple: int = 8) -> tuple[int, int]:
    """The (width, height) with the aspect ratio of `width`x`height` and an area of about `target_area`.

    Each side is rounded to the nearest multiple of `multiple`, and is at least `multiple`.
    """
    if width <= 0 or height <= 0 or target_area <= 0 or multiple <= 0:
        raise InvalidRequestError(
            f"cannot fit size {width}x{height} to area {target_area} in multiples of {multiple}: all must be positive"
        )
    scale = math.sqrt(target_area / (width * height))

    def snap(side: float) -> int:
        return max(multiple, math.floor(side / multiple + 0.5) * multiple)

    return snap(width * scale), snap(height * scale)


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at exactly `width`x`height` (Lanczos, like diffusers' VaeImageProcessor); as is if already that size."""
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"cannot resize an image to {width}x{height}: sizes must be positive")
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Same-size images as an (N, 3, H, W) float32 tensor in [-1, 1], the VAE's input range."""
    if not images:
        raise ValueError("pil_to_tensor needs at least one image")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"pil_to_tensor needs images of one size, got {sorted(sizes)}")
    batch = np.stack([np.asarray(image if image.mode == "RGB" else image.convert("RGB")) for image in images])
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32)
    return (tensor / 255.0 * 2.0 - 1.0).contiguous()


def tensor_to_pil(t: torch.Tensor) -> list[Image.Image]:
    """RGB images from an (N, 3, H, W) tensor in [0, 1], clamped and rounded like diffusers' numpy_to_pil."""
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"tensor_to_pil needs an (N, 3, H, W) tensor, got shape {tuple(t.shape)}")
    # float32 before scaling, so fp16/bf16 outputs round the same way diffusers does.
    # NaN (e.g. an fp16 VAE overflow) becomes 0 here; callers that care must check before.
    values = t.detach().to(device="cpu", dtype=torch.float32).nan_to_num(0.0).clamp(0.0, 1.0)
    pixels = (values * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(array) for array in pixels]


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        # Pillow's own conversion clips 16-bit values at 255, turning most of the image white.
        values = np.asarray(image).astype(np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
            values = values / 257.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, _WHITE)
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
