"""Generation parameters stored in PNGs, in the infotext format AUTOMATIC1111's webui writes.

The text goes in the PNG `parameters` chunk, where A1111, ComfyUI loaders, civitai and sd-parsers
look for it::

    a photo of a cat, 4k
    Negative prompt: blurry
    Steps: 1, Sampler: Euler a, Schedule type: Automatic, CFG scale: 0, Seed: 42, Size: 512x512, ...

The prompt comes first (it may span lines), then an optional `Negative prompt:` line (which may
also span lines), and last a line of comma-separated `Key: value` pairs. A value that contains a
comma, colon, newline or quote is written as a JSON string.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from dataclasses import KW_ONLY, dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from turbokit.errors import InvalidRequestError, TurbokitError

PNG_TEXT_KEY = "parameters"
_NEGATIVE_PREFIX = "Negative prompt:"

# One `Key: value` pair of the last line. Keys are words, spaces, '-' and '/' (as A1111 allows);
# the value is a JSON string (which may hide commas and colons) or anything up to the next comma.
_PAIR = re.compile(
    r"""
    \s*(?P<key>\w[\w \-/]*):\s*
    (?P<value>"(?:\\.|[^\\"])+"|[^,]*)
    (?:,|$)
    """,
    re.VERBOSE,
)
_SIZE = re.compile(r"^(\d+)\s*x\s*(\d+)$")


@dataclass(frozen=True)
class GenerationParameters:
    """What produced an image: enough to regenerate it, and what other tools show for it."""

    prompt: str
    _: KW_ONLY
    negative_prompt: str = ""
    steps: int
    seed: int
    width: int
    height: int
    model: str
    guidance_scale: float = 0.0
    sampler: str = "Euler"  # as A1111 spells them: "Euler" or "Euler a"
    strength: float | None = None  # img2img denoising strength; None for text-to-image

    def to_infotext(self) -> str:
        """The A1111 infotext: prompt, optional `Negative prompt:` line, then the `Key: value` line."""
        fields: dict[str, str | None] = {
            "Steps": str(self.steps),
            "Sampler": self.sampler,
            # A1111 reads a missing schedule type as "Automatic" too; writing it matches what it writes.
            "Schedule type": "Automatic",
            "CFG scale": _format_number(self.guidance_scale),
            "Seed": str(self.seed),
            "Size": f"{self.width}x{self.height}",
            "Model": self.model,
            "Denoising strength": None if self.strength is None else _format_number(self.strength),
            "Version": _version_label(),
        }
        pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
        text = self.prompt
        if self.negative_prompt:
            text += f"\n{_NEGATIVE_PREFIX} {self.negative_prompt}"
        # Same outer strip as A1111, so an empty prompt does not leave a blank first line.
        return f"{text}\n{pairs}".strip()

    @classmethod
    def from_infotext(cls, text: str) -> GenerationParameters:
        """Parse an infotext written by turbokit, A1111 or a compatible tool; unknown keys are ignored.

        Raises TurbokitError if Steps, Seed, Size or Model is missing or malformed.
        """
        prompt, negative_prompt, values = _split_infotext(text)
        if not values:
            raise TurbokitError("no generation parameters found: the text has no 'Steps: ..., Seed: ...' line")

        size = _require(values, "Size")
        match = _SIZE.match(size)
        if match is None:
            raise TurbokitError(f"bad Size {size!r} in generation parameters; expected WIDTHxHEIGHT like 512x512")
        strength = values.get("Denoising strength")
        return cls(
            prompt,
            negative_prompt=negative_prompt,
            steps=_to_int(values, "Steps"),
            seed=_to_int(values, "Seed"),
            width=int(match.group(1)),
            height=int(match.group(2)),
            model=_require(values, "Model"),
            guidance_scale=_to_float(values, "CFG scale") if "CFG scale" in values else 0.0,
            sampler=values.get("Sampler", "Euler"),
            strength=None if strength is None else _to_float(values, "Denoising strength"),
        )


def save_png(image: Image.Image, path: Path, params: GenerationParameters) -> Path:
    """Write `image` as a PNG with `params` in its `parameters` chunk; returns the path.

    The file appears complete or not at all: it is written to a hidden temp file in the same
    directory, flushed to disk, then renamed over `path`. Missing parent directories are created.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidRequestError(f"cannot save {path}: the output file name must end in .png")
    info = PngInfo()
    # add_text falls back to an iTXt (UTF-8) chunk when the text is not Latin-1.
    info.add_text(PNG_TEXT_KEY, params.to_infotext())

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 so the final file gets the usual umask-based permissions
        # (tempfile.mkstemp would leave it 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise TurbokitError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        _discard(tmp)
        raise
    return path


def read_parameters(path: str | Path) -> GenerationParameters | None:
    """The generation parameters stored in an image's `parameters` text, or None if it has none.

    Raises TurbokitError if the file cannot be read as an image or its parameters cannot be parsed.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_TEXT_KEY)
            if text is None and hasattr(image, "text"):
                # Chunks after the image data only show up in .text, which decodes the whole file.
                text = image.text.get(PNG_TEXT_KEY)
    except UnidentifiedImageError as err:
        raise TurbokitError(f"cannot read parameters from {path}: not an image file") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise TurbokitError(f"cannot read parameters from {path}: {reason}") from err
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        return GenerationParameters.from_infotext(str(text))
    except TurbokitError as err:
        raise TurbokitError(f"{path}: {err}") from err


def _split_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, key -> unquoted value), following A1111's parsing rules."""
    *lines, last = text.strip().split("\n")
    pairs = _PAIR.findall(last)
    # Like A1111: the last line holds the parameters only if it has at least 3 pairs.
    if len(pairs) < 3:
        lines.append(last)
        pairs = []

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()  # A1111 strips every line (this also drops the \r of CRLF text)
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    values = {key.strip(): _unquote(value) for key, value in pairs}
    return "\n".join(prompt_lines), "\n".join(negative_lines), values


def _quote(value: str) -> str:
    # A1111 quotes values with ',', ':' or newlines. Quotes and edge whitespace are quoted too:
    # unquoted they would be misread (a value like "x" would lose its quotes, " x" its space).
    if any(c in value for c in ',:\n"') or value != value.strip() or not value:
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, str):
            return decoded
    return value.strip()


def _format_number(value: float) -> str:
    """Shortest text that reads back as the same float, without a trailing `.0` (7.0 -> "7")."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _require(values: dict[str, str], key: str) -> str:
    try:
        return values[key]
    except KeyError:
        raise TurbokitError(f"generation parameters have no {key!r} value") from None


def _to_int(values: dict[str, str], key: str) -> int:
    text = _require(values, key)
    try:
        return int(text)
    except ValueError:
        raise TurbokitError(f"bad {key} {text!r} in generation parameters; expected a whole number") from None


def _to_float(values: dict[str, str], key: str) -> float:
    text = _require(values, key)
    try:
        return float(text)
    except ValueError:
        raise TurbokitError(f"bad {key} {text!r} in generation parameters; expected a number") from None


def _version_label() -> str:
    try:
        return f"turbokit {importlib_metadata.version('turbokit')}"
    except importlib_metadata.PackageNotFoundError:
        return "turbokit"  # running from a source tree that is not installed


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
