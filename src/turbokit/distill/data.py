"""Training data for `turbokit distill`: (image or latent, caption) batches that survive bad files and resume exactly.

Sources (`build_source` picks one from what the path is):

- a folder of images, each with a same-name `.txt` caption (`cat.jpg` + `cat.txt`), subfolders included;
- a JSONL file of `{"image": path, "text": caption}` lines, paths relative to the JSONL's folder
  (`"file_name"` is read too, as in Hugging Face's `metadata.jsonl`);
- WebDataset tar shards: one `.tar`, a folder of them, a glob (`shards/*.tar`) or a brace range
  (`shards/data-{000..099}.tar`); members grouped by name up to the first dot, an image
  (`.jpg`, `.jpeg`, `.png`, `.webp`) plus a `.txt` caption per group;
- a cache of teacher latents for LADD's prompt-only training (`turbokit.distill.synthetic`).

Every source is indexed when it is built, so an unusable dataset fails in one line before any
model loads, and the loader shuffles over the whole dataset. Samples without a caption or image,
and malformed JSONL lines, are left out at that point and counted. Samples that turn out
unreadable when loaded (corrupt or truncated images, missing files, captions that are not UTF-8)
are skipped, counted and replaced in their batch by another sample, so a run never dies on one
bad file. The issue's requirements: "A folder of images with same-name .txt captions; a JSONL of
{"image", "text"}; WebDataset tar shards (jpg/png/webp + txt) ... Unreadable or corrupt samples are
skipped and counted" and "--resume_from_checkpoint restores ... the step and the data position".
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import logging
import os
import re
import tarfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image

from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.images import load_image, open_image, pil_to_tensor

if TYPE_CHECKING:
    from turbokit.distill.synthetic import PromptSource

log = logging.getLogger("turbokit")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""Image files the folder and tar sources pick up (in this order of preference within a tar group)."""
MAX_EXAMPLES = 5
"""How many skipped samples are quoted by name in the log."""
MAX_PICKS = 100
"""Random picks tried to replace an unreadable sample before the dataset is declared unreadable."""
STATE_FORMAT = "turbokit-data-position"


@dataclass
class Sample:
    """One training example: pixels for image sources, latents for latent caches, and its caption."""

    caption: str
    pixels: torch.Tensor | None = None
    """(3, H, W) float32 in [-1, 1], the VAE's input range."""
    latents: torch.Tensor | None = None
    """(C, h, w) float32 in the model's scaled latent space."""
    original_size: tuple[int, int] = (0, 0)
    """(height, width) of the image before resizing and cropping: SDXL's micro-conditioning."""
    crop_top_left: tuple[int, int] = (0, 0)
    """(top, left) of the crop in the resized (and, if flipped, flipped) image: SDXL's micro-conditioning."""


@dataclass
class Batch:
    """Samples stacked for one step of one process."""

    captions: list[str]
    pixels: torch.Tensor | None
    """(N, 3, H, W) in [-1, 1], or None for latent sources."""
    latents: torch.Tensor | None
    """(N, C, h, w), or None for image sources."""
    original_sizes: torch.Tensor
    """(N, 2) int64 (height, width)."""
    crop_top_lefts: torch.Tensor
    """(N, 2) int64 (top, left)."""

    @classmethod
    def collate(cls, samples: Sequence[Sample]) -> Batch:
        pixels = [s.pixels for s in samples if s.pixels is not None]
        latents = [s.latents for s in samples if s.latents is not None]
        return cls(
            captions=[s.caption for s in samples],
            pixels=torch.stack(pixels) if pixels else None,
            latents=torch.stack(latents) if latents else None,
            original_sizes=torch.tensor([s.original_size for s in samples], dtype=torch.int64),
            crop_top_lefts=torch.tensor([s.crop_top_left for s in samples], dtype=torch.int64),
        )


@dataclass
class SkippedSamples:
    """A count of samples left out, with the first few reasons kept for a log line."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(reason)


class Source(Protocol):
    """An indexed dataset. `load` raises TurbokitError, naming the file, for an unreadable sample."""

    name: str
    sample_size: tuple[int, int] | None
    """(height, width) in pixels of every sample of a latent cache; None when the loader resizes images."""
    skipped: SkippedSamples
    """Samples left out while indexing (no caption, malformed JSONL line, damaged shard)."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image | torch.Tensor, str]: ...


# ---------------------------------------------------------------------------------------------- sources


class ImageFolderSource:
    """Images under `root` (subfolders included, hidden ones not), each with a same-name `.txt` caption.

    An image without a caption is left out and counted rather than trained on with an empty
    caption: a missing caption is far more often a mistake than a wish (an empty `.txt` file is
    how to say "no caption"). With `captions=False` (training that ignores captions, like
    `turbokit distill-decoder`) every image is used and a missing caption reads as ""."""

    sample_size = None

    def __init__(self, root: str | Path, captions: bool = True) -> None:
        self.root = Path(root)
        self.name = str(self.root)
        self.skipped = SkippedSamples()
        if not self.root.is_dir():
            raise TurbokitError(f"training data {self.root} is not a folder")
        images: list[Path] = []
        caption_files: set[Path] = set()
        for folder, subfolders, files in os.walk(self.root):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            for file in files:
                if file.startswith("."):
                    continue
                path = Path(folder, file)
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(path)
                elif path.suffix == ".txt":
                    caption_files.add(path)
        images.sort()  # the index must not depend on the filesystem's listing order (resume relies on it)
        self._pairs: list[tuple[Path, Path | None]] = []
        for image in images:
            caption = image.with_suffix(".txt")
            if caption in caption_files:
                self._pairs.append((image, caption))
            elif not captions:
                self._pairs.append((image, None))
            else:
                self.skipped.add(f"{image}: no caption file {caption.name}")
        if not images:
            raise TurbokitError(
                f"no images found in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, subfolders included)"
            )
        if not self._pairs:
            image = images[0]
            raise TurbokitError(
                f"no images with captions found in {self.root}: {len(images)} images but none has a same-name "
                f".txt caption (e.g. {image.name} needs {image.with_suffix('.txt').name} beside it)"
            )
        _log_skipped(self)

    def __len__(self) -> int:
        return len(self._pairs)

    def load(self, index: int) -> tuple[Image.Image, str]:
        image, caption = self._pairs[index]
        return load_image(image), "" if caption is None else _decode_caption(_read_file(caption), str(caption))


class JsonlSource:
    """Lines of `{"image": path, "text": caption}`; relative paths are relative to the JSONL's folder.

    Malformed lines and lines naming a file that does not exist are left out and counted."""

    sample_size = None

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.skipped = SkippedSamples()
        self._records: list[tuple[Path, str]] = []
        try:
            with open(self.path, "rb") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        self._add(line, f"{self.path}:{number}")
        except OSError as err:
            raise TurbokitError(f"cannot read {self.path}: {err.strerror or err}") from err
        if not self._records:
            detail = "it is empty"
            if self.skipped.count:
                detail = f"{self.skipped.count} lines left out, first: {self.skipped.examples[0]}"
            raise TurbokitError(f'no usable {{"image", "text"}} lines in {self.path} ({detail})')
        _log_skipped(self)

    def _add(self, line: bytes, where: str) -> None:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self.skipped.add(f"{where}: not a line of UTF-8 JSON ({err})")
            return
        image = record.get("image", record.get("file_name")) if isinstance(record, dict) else None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(image, str) or not image or not isinstance(text, str):
            self.skipped.add(f'{where}: expected {{"image": "path", "text": "caption"}}')
            return
        image_path = self.path.parent / image  # an absolute `image` stays as it is
        if not image_path.is_file():
            self.skipped.add(f"{where}: image {image_path} not found")
            return
        self._records.append((image_path, text.strip()))

    def __len__(self) -> int:
        return len(self._records)

    def load(self, index: int) -> tuple[Image.Image, str]:
        image, caption = self._records[index]
        return load_image(image), caption


@dataclass(frozen=True)
class _TarEntry:
    key: str
    image: tuple[int, int]  # (offset, size) of the member's data in the shard
    caption: tuple[int, int]


class TarShardSource:
    """WebDataset shards read with `tarfile`: each group of members sharing a name up to the first dot
    is one sample, an image (`.jpg`, `.jpeg`, `.png` or `.webp`) and a `.txt` caption.

    The shards' headers are read once when the source is built (no image data), so samples are read
    directly by offset and shuffled over all shards. Only uncompressed tars can be read that way."""

    sample_size = None

    def __init__(self, shards: str | Path | Sequence[str | Path]) -> None:
        self.shards = expand_shards(shards) if isinstance(shards, str | Path) else [Path(s) for s in shards]
        self.name = str(shards) if isinstance(shards, str | Path) else f"{len(self.shards)} tar shards"
        self.skipped = SkippedSamples()
        if not self.shards:
            raise TurbokitError(f"no .tar shards match {shards}")
        self._entries = [self._scan(shard) for shard in self.shards]
        self._starts = np.cumsum([0] + [len(e) for e in self._entries]).tolist()
        if not len(self):
            first = f" (first: {self.skipped.examples[0]})" if self.skipped.examples else ""
            raise TurbokitError(f"no image + .txt caption pairs found in {self.name}{first}")
        _log_skipped(self)

    def _scan(self, shard: Path) -> list[_TarEntry]:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    folder, _, base = info.name.rpartition("/")
                    stem, dot, extension = base.partition(".")  # WebDataset: the key ends at the first dot
                    if info.isfile() and dot and stem:
                        groups.setdefault(f"{folder}/{stem}" if folder else stem, {}).setdefault(
                            "." + extension.lower(), info
                        )
        except (tarfile.TarError, OSError, EOFError) as err:
            if not shard.is_file():
                raise TurbokitError(f"tar shard {shard} not found") from err
            self.skipped.add(f"{shard}: unreadable after {len(groups)} samples, the rest left out ({_one_line(err)})")
        entries = []
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            caption = members.get(".txt")
            if image is None or caption is None:
                self.skipped.add(f"{shard}:{key}: no {'image' if image is None else '.txt caption'}")
                continue
            entries.append(_TarEntry(key, (image.offset_data, image.size), (caption.offset_data, caption.size)))
        return entries

    def __len__(self) -> int:
        return self._starts[-1]

    def load(self, index: int) -> tuple[Image.Image, str]:
        shard = bisect.bisect_right(self._starts, index) - 1
        entry = self._entries[shard][index - self._starts[shard]]
        name = f"{self.shards[shard]}:{entry.key}"
        try:
            with open(self.shards[shard], "rb") as file:
                image = _read_exactly(file, *entry.image, name)
                caption = _read_exactly(file, *entry.caption, name)
        except OSError as err:
            raise TurbokitError(f"cannot read {name}: {err.strerror or err}") from err
        return _decode_image(image, name), _decode_caption(caption, name)


def expand_shards(pattern: str | Path) -> list[Path]:
    """Shard paths from a `.tar` file, a folder of them, a glob, or a WebDataset brace range (`{000..099}`)."""
    if isinstance(pattern, Path) or Path(pattern).exists() or not re.search(r"[*?\[{]", pattern):
        path = Path(pattern)
        return sorted(path.glob("*.tar")) if path.is_dir() else [path]
    paths: list[Path] = []
    for expanded in _expand_braces(pattern):
        if re.search(r"[*?\[]", expanded):
            paths.extend(Path(p) for p in sorted(glob.glob(expanded)))
        else:
            paths.append(Path(expanded))
    return paths


def build_source(path: str | Path, synthetic: bool = False, captions: bool = True) -> Source | PromptSource:
    """The source for `path`, chosen by what it is; TurbokitError in one line if it holds no usable samples.

    A `shapes:` URI (turbokit's synthetic dataset), a synthetic latent cache (a folder with its
    manifest), `.jsonl`, a `.tar` or a shard pattern, a folder of `.tar` shards (and no images at its
    top), or a folder of images. With `synthetic`, `path` is a synthetic latent cache or a prompts
    file, one prompt per line (a `PromptSource`). With `captions=False`, a folder's images need no
    `.txt` captions."""
    from turbokit.distill import synthetic as synthetic_cache  # imports this module
    from turbokit.recipes.shapes import parse_shapes_uri  # imports this module too

    if (shapes := parse_shapes_uri(str(path))) is not None:  # the built-in `shapes:SPLIT?n=N&size=S` data
        return shapes

    text = str(path)
    path = Path(path)
    if (path / synthetic_cache.MANIFEST_NAME).is_file() or (synthetic and path.is_dir()):
        return synthetic_cache.SyntheticLatentSource(path)
    if synthetic:
        return synthetic_cache.PromptSource(path)
    if path.suffix.lower() == ".tar" or (not path.exists() and re.search(r"[*?\[{]", text)):
        return TarShardSource(text)
    if not path.exists():
        raise TurbokitError(f"training data {path} not found")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return JsonlSource(path)
    if path.is_dir():
        top = [p for p in path.iterdir() if not p.name.startswith(".")]
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in top)
        if not has_images and any(p.suffix.lower() == ".tar" for p in top):
            return TarShardSource(path)
        return ImageFolderSource(path, captions)
    raise TurbokitError(
        f"cannot read training data from {path}: give a folder of images with .txt captions, a .jsonl file, "
        ".tar shards, or a synthetic latent cache"
    )


# ---------------------------------------------------------------------------------------------- preprocessing


def preprocess(
    image: Image.Image,
    resolution: int,
    rng: np.random.Generator | None = None,
    random_crop: bool = False,
    random_flip: bool = False,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Shorter side resized to `resolution`, then a square crop (centred, or random with `rng`) and an
    optional horizontal flip (p = 0.5). Returns the (3, R, R) pixels in [-1, 1], the original (height,
    width) and the crop's (top, left) in the resized image (flipped with it), as SDXL's training
    conditions on them."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized_w, resized_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if random_crop:
        assert rng is not None, "random_crop needs an rng"
        top, left = int(rng.integers(resized_h - resolution + 1)), int(rng.integers(resized_w - resolution + 1))
    else:
        top, left = (resized_h - resolution) // 2, (resized_w - resolution) // 2
    # Resampling only the crop's box of the original gives the same pixels as resize-then-crop without
    # the full resized image (which a 1:50 panorama would make huge).
    box = (left / scale, top / scale, (left + resolution) / scale, (top + resolution) / scale)
    crop = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    pixels = pil_to_tensor([crop])[0]
    if random_flip:
        assert rng is not None, "random_flip needs an rng"
        if rng.random() < 0.5:
            pixels = pixels.flip(-1)
            left = resized_w - left - resolution  # the crop's place in the flipped image, which the model sees
    return pixels, (height, width), (top, left)


# ---------------------------------------------------------------------------------------------- loader


class ResumableLoader:
    """Endless batches from a source, the same for the same seed, resumable to the exact next batch.

    The stream is the concatenation of one seeded permutation of the dataset per epoch; each step
    takes the next `batch_size × world_size` positions (a global batch may span an epoch boundary),
    of which process `rank` loads the slice `[rank × batch_size, (rank + 1) × batch_size)`. A sample
    that cannot be read is counted and replaced by a random one picked from the seed and its
    position, so every process still advances in step and `state_dict()` is the same on all of them.
    With `num_workers` > 0, that many threads decode a batch and the next batch is decoded while the
    caller trains on this one."""

    def __init__(
        self,
        source: Source,
        batch_size: int,
        resolution: int,
        *,
        seed: int = 0,
        random_crop: bool = False,
        random_flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1 or resolution < 1 or seed < 0 or num_workers < 0:
            raise InvalidRequestError(
                f"batch size ({batch_size}) and resolution ({resolution}) must be positive, "
                f"seed ({seed}) and num_workers ({num_workers}) not negative"
            )
        if not 0 <= rank < world_size:
            raise InvalidRequestError(f"rank {rank} is not one of the {world_size} processes")
        if len(source) == 0:
            raise TurbokitError(f"no samples in {source.name}")
        if source.sample_size is not None and source.sample_size != (resolution, resolution):
            height, width = source.sample_size
            raise TurbokitError(
                f"{source.name} holds {width}x{height} samples but the training resolution is {resolution}: "
                "generate the cache at this resolution, or train at its own"
            )
        self.source, self.batch_size, self.resolution = source, batch_size, resolution
        self.seed, self.random_crop, self.random_flip = seed, random_crop, random_flip
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0  # the stream position of the next global batch
        self._bad: set[int] = set()  # indices found unreadable: not tried again
        self._load_skips = SkippedSamples()
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="turbokit-data") if num_workers else None
        self._pending: tuple[tuple[int, int], list[Future[Sample]]] | None = None

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != (self.epoch, self.index):
            pending = ((self.epoch, self.index), self._submit(self.epoch, self.index))
        self.epoch, self.index = self._advance(self.epoch, self.index, self.batch_size * self.world_size)
        if self._pool is not None:
            self._pending = ((self.epoch, self.index), self._submit(self.epoch, self.index))
        return Batch.collate([future.result() for future in pending[1]])

    @property
    def bad_samples(self) -> int:
        """Samples skipped so far: left out while indexing, or found unreadable by this process."""
        return self.source.skipped.count + self._load_skips.count

    @property
    def bad_examples(self) -> list[str]:
        """The first few skipped samples, each as `path: reason`."""
        return (self.source.skipped.examples + self._load_skips.examples)[:MAX_EXAMPLES]

    def bad_sample_report(self) -> str | None:
        """One log line about skipped samples, or None when there were none."""
        if not self.bad_samples:
            return None
        first = "; ".join(self.bad_examples)
        return f"skipped {self.bad_samples} unreadable or incomplete samples of {self.source.name}; first: {first}"

    def state_dict(self) -> dict[str, Any]:
        """The data position as plain JSON-able values; the position is the same on every process."""
        with self._lock:  # decoding threads may be adding bad samples
            bad, examples = sorted(self._bad), list(self._load_skips.examples)
        return {
            "format": STATE_FORMAT,
            "version": 1,
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
            "num_samples": len(self.source),
            "bad_indices": bad,
            "bad_examples": examples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batches are those the saved run would have yielded next."""
        if state.get("format") != STATE_FORMAT or state.get("version") != 1:
            raise TurbokitError("the checkpoint's data position is not one this turbokit version can read")
        if state["seed"] != self.seed:
            log.info(f"resuming with the checkpoint's data seed {state['seed']} (not {self.seed})")
        if self._pending is not None:  # let prefetching threads finish before their state is replaced
            wait(self._pending[1])
            self._pending = None
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._orders.clear()
        self._bad = set(state["bad_indices"])
        self._load_skips = SkippedSamples(len(self._bad), list(state["bad_examples"]))
        if state["num_samples"] != len(self.source):
            log.warning(
                f"the training data has changed since the checkpoint ({state['num_samples']} samples then, "
                f"{len(self.source)} now): resuming in epoch {self.epoch}, but not with the batches of the first run"
            )
            self.epoch, self.index = self._advance(self.epoch, 0, self.index)
            self._bad = set()  # indices into the old listing

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _advance(self, epoch: int, index: int, steps: int) -> tuple[int, int]:
        n = len(self.source)
        return epoch + (index + steps) // n, (index + steps) % n

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:  # a global batch spans several epochs only when it exceeds the dataset
                del self._orders[min(self._orders)]
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(len(self.source))
        return self._orders[epoch]

    def _submit(self, epoch: int, index: int) -> list[Future[Sample]]:
        futures = []
        for k in range(self.batch_size):
            slot = self._advance(epoch, index, self.rank * self.batch_size + k)
            ref = int(self._order(slot[0])[slot[1]])
            if self._pool is not None:
                futures.append(self._pool.submit(self._load, slot, ref))
            else:
                future: Future[Sample] = Future()
                future.set_result(self._load(slot, ref))
                futures.append(future)
        return futures

    def _load(self, slot: tuple[int, int], ref: int) -> Sample:
        """The sample at stream position `slot`: dataset index `ref`, or a seeded replacement if unreadable."""
        rng = np.random.default_rng((self.seed, *slot))
        for _ in range(MAX_PICKS):
            if ref not in self._bad:  # a known-bad index gives the same outcome untried
                try:
                    data, caption = self.source.load(ref)
                except TurbokitError as err:
                    self._mark_bad(ref, str(err))
                else:
                    return self._sample(data, caption, rng)
            ref = int(rng.integers(len(self.source)))
        raise TurbokitError(
            f"{len(self._bad)} of the {len(self.source)} samples in {self.source.name} are unreadable and "
            f"{MAX_PICKS} random picks found no readable one; first: " + "; ".join(self.bad_examples)
        )

    def _mark_bad(self, ref: int, reason: str) -> None:
        with self._lock:
            if ref in self._bad:
                return
            self._bad.add(ref)
            if self._load_skips.count < MAX_EXAMPLES:
                log.warning(f"skipping an unreadable sample: {reason}")
            self._load_skips.add(reason)

    def _sample(self, data: Image.Image | torch.Tensor, caption: str, rng: np.random.Generator) -> Sample:
        if isinstance(data, torch.Tensor):
            assert self.source.sample_size is not None, "latent sources have a fixed sample size"
            return Sample(caption, latents=data, original_size=self.source.sample_size)
        pixels, original_size, crop_top_left = preprocess(
            data, self.resolution, rng, self.random_crop, self.random_flip
        )
        return Sample(caption, pixels=pixels, original_size=original_size, crop_top_left=crop_top_left)


# ---------------------------------------------------------------------------------------------- helpers


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise TurbokitError(f"cannot read {path}: {err.strerror or err}") from err


def _read_exactly(file: io.BufferedReader, offset: int, size: int, name: str) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise TurbokitError(f"cannot read {name}: the shard ends inside it (truncated)")
    return data


def _decode_caption(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise TurbokitError(f"caption of {name} is not UTF-8 text ({err.reason} at byte {err.start})") from err


def _decode_image(data: bytes, name: str) -> Image.Image:
    """`load_image` for bytes from a tar member: RGB, upright, first frame, within the pixel limit."""
    return open_image(io.BytesIO(data), name=name)


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: `{000..099}` (zero-padded numeric range) and `{a,b}` alternatives."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", match[1])
    if numeric:
        width = len(numeric[1])
        options = [f"{i:0{width}d}" for i in range(int(numeric[1]), int(numeric[2]) + 1)]
    else:
        options = match[1].split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


def _log_skipped(source: Source) -> None:
    if source.skipped.count:
        log.warning(
            f"left out {source.skipped.count} samples of {source.name} while indexing it; first: "
            + "; ".join(source.skipped.examples)
        )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
