"""What the server accepts and returns: pydantic models with their limits, and safe decoding of uploads.

The limits are part of the OpenAPI schema, so clients (and the fuzz test) see them; a request
outside them is answered 422 before anything runs. Checks that need the model or the server's
settings (`Settings.max_side`, the image-to-image step rule) answer 400 from `batch_key`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from typing import Annotated, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from turbokit import sampling
from turbokit.errors import InvalidRequestError
from turbokit.images import fit_size, open_image
from turbokit.pipeline import MAX_SEED, SAMPLERS
from turbokit.serve import Settings
from turbokit.serve.worker import BatchKey

MAX_SIDE = 2048
MAX_STEPS = 50
MAX_IMAGES = 8
MAX_PROMPT_CHARS = 2000
MAX_GUIDANCE = 30.0
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""An uploaded image, decoded from base64, at most (20 MiB)."""
MAX_PIXELS = 16 * 1024 * 1024
"""An uploaded image's width × height at most (16 megapixels), checked before its pixels are decoded."""
MAX_IMAGE_CHARS = 4 * -(-MAX_UPLOAD_BYTES // 3) + 256
"""An image field's length at most: MAX_UPLOAD_BYTES in base64, and room for a data-URL prefix."""
MAX_BODY_BYTES = MAX_IMAGE_CHARS + 64 * 1024
"""A request body or WebSocket message at most: one image and the settings."""
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
"""Image formats accepted: the common ones (Pillow's rarer plugins are never tried on user data)."""

_DATA_URL = re.compile(r"data:[\w.+/-]*(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)


Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]  # pydantic refuses unpaired surrogates
# Numbers are strict: in lax mode pydantic reads `true` as 1 and "2" as 2, a request the schema says is wrong
# (integer fields take JSON integers only; float fields take integers too).
Side = Annotated[int, Field(ge=8, le=MAX_SIDE, multiple_of=8, strict=True)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, strict=True, description="denoising steps; Turbo models: 1–4")]
Seed = Annotated[
    int, Field(ge=0, le=MAX_SEED, strict=True, description="base seed: image i gets seed + i; null for random")
]
Count = Annotated[int, Field(ge=1, le=MAX_IMAGES, strict=True, description="how many images")]
Guidance = Annotated[
    float,
    Field(
        ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, strict=True, description="classifier-free guidance; Turbo models: 0"
    ),
]
MIN_STRENGTH = 1 / MAX_STEPS
"""Below it no step count this server allows runs a step: image-to-image runs int(steps × strength)."""
Strength = Annotated[
    float,
    Field(
        ge=MIN_STRENGTH,
        le=1,
        allow_inf_nan=False,
        strict=True,
        description=f"image-to-image runs int(steps × strength) steps, so at least {MIN_STRENGTH:g}",
    ),
]
Sampler = Literal["euler", "euler_a"]
ImageData = Annotated[
    str,
    Field(
        max_length=MAX_IMAGE_CHARS,
        description=f"base64 image (raw or a data: URL); at most {MAX_UPLOAD_BYTES} bytes and {MAX_PIXELS} pixels",
    ),
]


class GenerationFields(BaseModel):
    """The pipeline's settings, shared by the HTTP requests and the live `params` message."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text
    negative_prompt: Text = Field("", description="needs guidance_scale > 1")
    steps: Steps = 1
    guidance_scale: Guidance = 0.0
    width: Side | None = Field(None, description="default: the model's native size (img2img: the source's shape)")
    height: Side | None = None
    seed: Seed | None = None
    sampler: Sampler | None = Field(None, description="default: as the model's scheduler config says")

    def batch_key(
        self,
        settings: Settings,
        native_size: int,
        *,
        strength: float | None = None,
        image: Image.Image | None = None,
        image_digest: str | None = None,
    ) -> BatchKey:
        """The settings as a BatchKey, checked against the server's limits and the img2img step rule.

        A missing side is filled in as the pipeline would: the model's native size, or for
        image-to-image the source's shape fitted to the native area; so requests that leave it out
        batch with those that give it, and its value is checked like a given one."""
        width, height = self.width, self.height
        if image is not None:
            fitted = fit_size(image.width, image.height, native_size**2)
            width, height = width or fitted[0], height or fitted[1]
        width, height = width or native_size, height or native_size
        for name, side in (("width", width), ("height", height)):
            if side > settings.max_side:
                raise InvalidRequestError(f"{name} {side} is over this server's limit of {settings.max_side}")
        if self.steps > settings.max_steps:
            raise InvalidRequestError(f"steps {self.steps} is over this server's limit of {settings.max_steps}")
        if strength is not None:
            sampling.img2img_steps(self.steps, strength)
        return BatchKey(
            self.negative_prompt,
            self.steps,
            self.guidance_scale,
            width,
            height,
            self.sampler,
            strength,
            image_digest,
        )


# ---------------------------------------------------------------------- /api


_EXAMPLE_IMAGE = (  # 16x16 orange, a PNG
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mM8UaHBQApgYiARjGoY1TB0NAAAgJwBiHEHVqAAAAAASUVORK5CYII="
)


class Txt2ImgRequest(GenerationFields):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "a fox in the snow", "seed": 42, "n": 2}]})

    n: Count = 1


class Img2ImgRequest(Txt2ImgRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"prompt": "a watercolour painting", "image": _EXAMPLE_IMAGE, "steps": 2, "strength": 0.5}]
        }
    )

    steps: Steps = 2
    image: ImageData
    strength: Strength = 0.5


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its A1111 `parameters` text chunk")
    seeds: list[int]
    parameters: list[str] = Field(description="each image's parameters as A1111 infotext")


class Limits(BaseModel):
    max_side: int
    max_steps: int
    max_images: int = MAX_IMAGES
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_guidance_scale: float = MAX_GUIDANCE
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS


class ModelInfo(BaseModel):
    name: str
    family: str = Field(description="sd1, sd2 or sdxl")
    native_size: int
    default_sampler: str
    samplers: list[str] = list(SAMPLERS)
    dtype: str
    vae_dtype: str
    device: str
    limits: Limits


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorResponse(BaseModel):
    detail: str


# ---------------------------------------------------------------------- /v1 (OpenAI's images API)


class OpenAIImageRequest(BaseModel):
    """OpenAI's `images/generations` request; fields turbokit has no use for (quality, style, ...) are ignored."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"prompt": "a red bicycle", "n": 1, "size": "512x512"}]}
    )

    prompt: Text
    n: Count = 1
    size: str = Field("512x512", pattern=r"^\d{1,5}x\d{1,5}$", description="WIDTHxHEIGHT, multiples of 8")
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="only b64_json is supported")
    model: str | None = Field(None, max_length=256, description="ignored: the server runs the model it loaded")
    user: str | None = Field(None, max_length=256, description="ignored")

    @field_validator("size")
    @classmethod
    def _size(cls, size: str) -> str:
        for side in map(int, size.split("x")):
            if side % 8 or not 8 <= side <= MAX_SIDE:
                raise ValueError(f"each side must be a multiple of 8 from 8 to {MAX_SIDE}")
        return size


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


# ---------------------------------------------------------------------- /ws


class LiveParams(GenerationFields):
    """A live session's settings; each `params` message replaces the previous one whole."""

    type: Literal["params"]
    prompt: Text = ""
    mode: Literal["txt2img", "img2img"] = "txt2img"
    strength: Strength = 0.5


# ---------------------------------------------------------------------- uploads


def decode_image(data: str) -> tuple[Image.Image, str]:
    """An uploaded base64 image (raw, or a data: URL) as upright RGB, and a digest of its bytes.

    Refuses, with InvalidRequestError, bad base64, more than MAX_UPLOAD_BYTES, more than
    MAX_PIXELS (read from the header, before the pixels are decoded: decompression bombs stop
    there), formats outside UPLOAD_FORMATS, and corrupt or truncated files."""
    match = _DATA_URL.match(data)
    payload = data[match.end() :] if match else data
    if len(payload) > MAX_IMAGE_CHARS:
        raise InvalidRequestError(f"the image is over the {MAX_UPLOAD_BYTES} byte limit")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("the image is not valid base64 (raw, or a data:image/...;base64, URL)") from None
    if not raw:
        raise InvalidRequestError("the image is empty")
    if len(raw) > MAX_UPLOAD_BYTES:
        raise InvalidRequestError(f"the image is {len(raw)} bytes, over the {MAX_UPLOAD_BYTES} byte limit")
    rgb = open_image(io.BytesIO(raw), name="upload", max_pixels=MAX_PIXELS, formats=UPLOAD_FORMATS)
    return rgb, hashlib.sha256(raw).hexdigest()
