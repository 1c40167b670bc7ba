"""`turbokit video`: image-to-image over every frame of a video ("game frames restyled in real time").

Frames are decoded and encoded with PyAV (FFmpeg in the wheel). Every frame uses the same seed, so
the noise is the same from frame to frame and the style stays stable; frames go through the model
in batches (one pipeline call per batch, as StreamDiffusion's stream batch does).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from turbokit.errors import TurbokitError
from turbokit.images import fit_size

OUTPUT_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264"}


@dataclass
class VideoInfo:
    """What turbokit needs to know about an input video before loading a model."""

    width: int
    height: int
    fps: Fraction
    frames: int | None  # None when the container does not say


def probe(path: Path) -> VideoInfo:
    """Open `path` and read its first video stream's size and rate (a clear error if it has none)."""
    import av

    if not path.is_file():
        raise TurbokitError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TurbokitError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            return VideoInfo(
                stream.codec_context.width, stream.codec_context.height, Fraction(rate), stream.frames or None
            )
    except av.FFmpegError as err:
        raise TurbokitError(f"cannot read video {path}: {err}") from err


def check_output(path: Path) -> None:
    if path.suffix.lower() not in OUTPUT_CODECS:
        raise TurbokitError(f"output {path}: use one of {', '.join(OUTPUT_CODECS)}")
    if not path.parent.is_dir():
        raise TurbokitError(f"output {path}: folder {path.parent} does not exist")


def frames(path: Path) -> Iterator[Image.Image]:
    """Decoded RGB frames; a corrupt frame mid-stream ends the video with a clear error."""
    import av

    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                yield frame.to_image()
    except av.FFmpegError as err:
        raise TurbokitError(f"cannot decode {path}: {err}") from err


def output_size(info: VideoInfo, native: int, size: tuple[int, int] | None) -> tuple[int, int]:
    """The requested size, or the input's aspect ratio at the model's native area (multiples of 8)."""
    return size or fit_size(info.width, info.height, native * native, 8)


class VideoWriter:
    """H.264 in an MP4/MKV/MOV container at the input's frame rate."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction) -> None:
        import av

        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream(OUTPUT_CODECS[path.suffix.lower()], rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"

    def write(self, image: Image.Image) -> None:
        import av

        for packet in self.stream.encode(av.VideoFrame.from_image(image)):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
