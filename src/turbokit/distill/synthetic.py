"""Synthetic training data for LADD: latents the teacher generates from prompts, cached on disk.

LADD trains on the teacher's own samples, generated with classifier-free guidance, so a list of
prompts is enough data (Sauer et al., "Fast High-Resolution Image Synthesis with Latent Adversarial
Diffusion Distillation", arXiv 2403.12015). The cache is a folder:

    synthetic.json                  the settings that made it (written first)
    latents-00000.safetensors       "latents": (n, C, h, w) float16; metadata "captions", "seeds": JSON lists
    latents-00001.safetensors       ...

Shard i holds prompts [i × shard_size, (i + 1) × shard_size). A shard file appears only complete
(written to a temporary name, then renamed), so a run that stops is resumed by generating the
shards that are missing; sample i always gets seed `seed + i`, whatever the batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from turbokit.distill.data import SkippedSamples
from turbokit.errors import InvalidRequestError, TurbokitError

if TYPE_CHECKING:
    from turbokit.pipeline import TurboPipeline

log = logging.getLogger("turbokit")

MANIFEST_NAME = "synthetic.json"
CACHE_FORMAT = "turbokit-synthetic-latents"


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines are ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise TurbokitError(f"prompts file {path} not found") from err
    except UnicodeDecodeError as err:
        raise TurbokitError(f"prompts file {path} is not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise TurbokitError(f"cannot read prompts file {path}: {err.strerror or err}") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise TurbokitError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def generate_synthetic_latents(
    teacher: TurboPipeline,
    prompts: list[str],
    cache_dir: str | Path,
    steps: int = 25,
    guidance_scale: float = 7.0,
    resolution: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    shard_size: int = 256,
) -> Path:
    """Fill `cache_dir` with the teacher's final latents for `prompts` (at `resolution`, default the
    teacher's native size) and return it. Shards already written by an earlier run with the same
    settings are kept; a cache made with other settings is an error rather than silently mixed."""
    if not prompts:
        raise TurbokitError("no prompts to generate synthetic latents from")
    if steps < 1 or batch_size < 1 or shard_size < 1:
        raise InvalidRequestError(
            f"steps ({steps}), batch size ({batch_size}) and shard size ({shard_size}) must be positive"
        )
    cache_dir = Path(cache_dir)
    size = resolution or teacher.native_size
    settings = {
        "format": CACHE_FORMAT,
        "version": 1,
        "teacher": teacher.model_name,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "sampler": teacher.default_sampler,
        "height": size,
        "width": size,
        "seed": seed,
        "num_samples": len(prompts),
        "shard_size": shard_size,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
    }
    if (cache_dir / MANIFEST_NAME).exists():
        cached = _read_manifest(cache_dir)
        changed = [
            "the prompts" if k == "prompts_sha256" else f"{k} {cached.get(k)} → {v}"
            for k, v in settings.items()
            if cached.get(k) != v
        ]
        if changed:
            raise TurbokitError(
                f"{cache_dir} holds latents made with other settings ({'; '.join(changed)}): "
                "give another cache folder, or delete this one"
            )
    elif cache_dir.exists() and any(cache_dir.iterdir()):
        raise TurbokitError(f"{cache_dir} is not empty and not a synthetic latent cache: give a new or empty folder")
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _written_atomically(cache_dir / MANIFEST_NAME) as tmp:
            tmp.write_text(json.dumps(settings, indent=2), encoding="utf-8")

    num_shards = math.ceil(len(prompts) / shard_size)
    missing = [i for i in range(num_shards) if not _shard_path(cache_dir, i).exists()]
    if len(missing) < num_shards:
        log.info(f"reusing {num_shards - len(missing)} of {num_shards} cached shards in {cache_dir}")
    from tqdm import tqdm

    todo = sum(len(prompts[i * shard_size : (i + 1) * shard_size]) for i in missing)
    with tqdm(total=todo, unit="latent", desc="teacher latents", disable=None, leave=False) as bar:
        for shard in missing:
            first = shard * shard_size
            captions = prompts[first : first + shard_size]
            seeds = [seed + first + i for i in range(len(captions))]
            latents = []
            for start in range(0, len(captions), batch_size):
                result = teacher(
                    captions[start : start + batch_size],
                    steps=steps,
                    guidance_scale=guidance_scale,
                    width=size,
                    height=size,
                    seed=seeds[start : start + batch_size],
                    decode=False,
                )
                latents.append(result.latents.float().cpu())
                bar.update(len(result.latents))
            stacked = torch.cat(latents)
            if not torch.isfinite(stacked).all():
                log.warning(f"the teacher made NaN/inf latents in shard {shard} (numeric overflow): try --dtype fp32")
            # float16 halves the cache; its rounding (~1e-3 relative) is far below the teacher's own error.
            tensors = {"latents": stacked.to(torch.float16).contiguous()}
            metadata = {"captions": json.dumps(captions), "seeds": json.dumps(seeds)}
            with _written_atomically(_shard_path(cache_dir, shard)) as tmp:
                save_file(tensors, tmp, metadata)
    return cache_dir


class PromptSource:
    """The prompts of a prompt-only dataset, read and checked before the teacher that turns them into
    latents is loaded. Not loadable itself: generate a cache from `prompts`, then read it with
    `SyntheticLatentSource`."""

    def __init__(self, path: str | Path) -> None:
        self.name = str(path)
        self.prompts = read_prompts(path)

    def __len__(self) -> int:
        return len(self.prompts)


class SyntheticLatentSource:
    """The latents and captions of a complete cache made by `generate_synthetic_latents`."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.name = str(self.cache_dir)
        self.skipped = SkippedSamples()
        manifest = _read_manifest(self.cache_dir)
        self.sample_size: tuple[int, int] | None = (manifest["height"], manifest["width"])
        self._length, self._shard_size = manifest["num_samples"], manifest["shard_size"]
        num_shards = math.ceil(self._length / self._shard_size)
        missing = [i for i in range(num_shards) if not _shard_path(self.cache_dir, i).exists()]
        if missing:
            raise TurbokitError(
                f"the synthetic latent cache {self.cache_dir} is incomplete ({len(missing)} of {num_shards} "
                "shards missing): run the generation again to finish it"
            )

    def __len__(self) -> int:
        return self._length

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        shard, row = divmod(index, self._shard_size)
        path = _shard_path(self.cache_dir, shard)
        try:
            with safe_open(path, "pt") as file:
                caption = json.loads(file.metadata()["captions"])[row]
                latents = file.get_slice("latents")[row : row + 1][0].float()
        except (OSError, SafetensorError, KeyError, IndexError, TypeError, ValueError) as err:
            raise TurbokitError(f"cannot read sample {row} of {path}: {err}") from err
        if not torch.isfinite(latents).all():
            raise TurbokitError(f"sample {row} of {path} has NaN/inf latents")
        return latents, caption


def _shard_path(cache_dir: Path, shard: int) -> Path:
    return cache_dir / f"latents-{shard:05d}.safetensors"


def _read_manifest(cache_dir: Path) -> dict[str, Any]:
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        raise TurbokitError(f"{cache_dir} is not a synthetic latent cache ({MANIFEST_NAME} missing): generate it first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TurbokitError(f"cannot read {path}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT or manifest.get("version") != 1:
        raise TurbokitError(f"{path} is not a synthetic latent cache manifest this turbokit version reads")
    return manifest


@contextmanager
def _written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path to write, renamed to `path` once written: a crash never leaves a partial file at `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    yield tmp
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())  # the data is on disk before the name says it is complete
    os.replace(tmp, path)
