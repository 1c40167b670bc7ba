"""Training data: each source's pairs, bad files skipped and counted, deterministic and resumable
batches, per-process slices, and the teacher's synthetic latents cached on disk."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from turbokit.distill.data import (
    ImageFolderSource,
    JsonlSource,
    ResumableLoader,
    TarShardSource,
    build_source,
    preprocess,
)
from turbokit.distill.synthetic import (
    PromptSource,
    SyntheticLatentSource,
    generate_synthetic_latents,
    read_prompts,
)
from turbokit.errors import TurbokitError
from turbokit.pipeline import TurboPipeline

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
}


def _image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _colour_folder(root: Path, names: list[str] | None = None) -> Path:
    for name in names or list(COLORS):
        _write(root / f"{name}.png", _image_bytes(COLORS[name]))
        _write(root / f"{name}.txt", f"{name}\n")
    return root


def _colour(pixels: torch.Tensor) -> tuple[int, ...]:
    return tuple(((pixels.mean(dim=(1, 2)) + 1) / 2 * 255).round().int().tolist())


def _assert_pairs_match(batch) -> None:
    for caption, pixels in zip(batch.captions, batch.pixels, strict=True):
        assert np.allclose(_colour(pixels), COLORS[caption], atol=8), caption


def _take(loader: ResumableLoader, n: int) -> list:
    return [next(loader) for _ in range(n)]


def _same(a: list, b: list) -> bool:
    return all(x.captions == y.captions and torch.equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------- sources


def test_image_folder_pairs(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write(root / "red.png", _image_bytes(COLORS["red"]))
    _write(root / "red.txt", "red")
    _write(root / "sub" / "green.jpg", _image_bytes(COLORS["green"], "JPEG"))
    _write(root / "sub" / "green.txt", "green")
    _write(root / "blue.webp", _image_bytes(COLORS["blue"], "WEBP", (16, 24)))
    _write(root / "blue.txt", "\ufeffblue  \n")
    _write(root / "orphan.png", _image_bytes(COLORS["white"]))  # no caption: left out and counted
    _write(root / ".hidden" / "black.png", _image_bytes(COLORS["black"]))
    _write(root / ".hidden" / "black.txt", "black")

    source = build_source(root)
    assert isinstance(source, ImageFolderSource)
    assert len(source) == 3
    assert source.skipped.count == 1 and "orphan.png" in source.skipped.examples[0]

    loader = ResumableLoader(source, batch_size=3, resolution=8)
    batch = next(loader)
    assert sorted(batch.captions) == ["blue", "green", "red"]
    assert batch.pixels.shape == (3, 3, 8, 8) and batch.latents is None
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    _assert_pairs_match(batch)
    sizes = {c: tuple(s.tolist()) for c, s in zip(batch.captions, batch.original_sizes, strict=True)}
    assert sizes == {"red": (16, 24), "green": (16, 24), "blue": (24, 16)}
    assert loader.bad_samples == 1


def test_jsonl_pairs_and_bad_lines(tmp_path: Path) -> None:
    _write(tmp_path / "img" / "red.png", _image_bytes(COLORS["red"]))
    green = _write(tmp_path / "elsewhere" / "green.png", _image_bytes(COLORS["green"]))
    _write(tmp_path / "img" / "blue.png", _image_bytes(COLORS["blue"]))
    lines = [
        json.dumps({"image": "img/red.png", "text": "red"}),
        json.dumps({"image": str(green), "text": " green "}),  # absolute path
        "",
        json.dumps({"file_name": "img/blue.png", "text": "blue"}),  # Hugging Face's metadata.jsonl key
        '{"image": "img/red.png", "text": ',  # malformed
        "[1, 2]",
        json.dumps({"image": "img/missing.png", "text": "gone"}),
        json.dumps({"image": "img/red.png"}),
    ]
    path = _write(tmp_path / "data.jsonl", "\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")

    source = build_source(path)
    assert isinstance(source, JsonlSource)
    assert len(source) == 3
    assert source.skipped.count == 5
    assert any("missing.png not found" in e for e in source.skipped.examples)
    batch = next(ResumableLoader(source, batch_size=3, resolution=8))
    assert sorted(batch.captions) == ["blue", "green", "red"]
    _assert_pairs_match(batch)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_shards(tmp_path: Path) -> None:
    _tar(
        tmp_path / "shard-0.tar",
        {
            "0001.jpg": _image_bytes(COLORS["red"], "JPEG"),
            "0001.txt": b"red",
            "sub/0002.png": _image_bytes(COLORS["green"]),
            "sub/0002.txt": b"green",
            "0003.jpg": _image_bytes(COLORS["white"], "JPEG"),  # no caption
        },
    )
    _tar(
        tmp_path / "shard-1.tar",
        {
            "0004.webp": _image_bytes(COLORS["blue"], "WEBP"),
            "0004.txt": b"blue",
            "0005.jpg": _image_bytes(COLORS["black"], "JPEG")[:40],  # corrupt member
            "0005.txt": b"black",
            "0006.txt": b"no image",
        },
    )
    for spec in (tmp_path / "shard-{0..1}.tar", tmp_path / "*.tar", tmp_path):
        source = build_source(spec if spec == tmp_path else str(spec))
        assert isinstance(source, TarShardSource) and len(source) == 4 and source.skipped.count == 2

    loader = ResumableLoader(source, batch_size=1, resolution=8)
    batches = _take(loader, 8)
    for batch in batches:
        _assert_pairs_match(batch)
    assert {b.captions[0] for b in batches} == {"red", "green", "blue"}
    assert loader.bad_samples == 3
    assert any("shard-1.tar:0005" in e for e in loader.bad_examples)


def test_truncated_shard_keeps_its_complete_samples(tmp_path: Path) -> None:
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noise, "PNG")
    members = {f"{i:04d}.{ext}": data for i in range(3) for ext, data in (("txt", b"noise"), ("png", noise.getvalue()))}
    whole = _tar(tmp_path / "whole.tar", members)
    with tarfile.open(whole) as tar:
        cut_at = tar.getmember("0001.png").offset_data + 100  # inside the second sample's image
    source = TarShardSource(_write(tmp_path / "cut.tar", whole.read_bytes()[:cut_at]))
    assert len(source) == 2 and source.skipped.count == 1  # 0001 is listed, and only fails when read
    loader = ResumableLoader(source, batch_size=2, resolution=8)
    for batch in _take(loader, 3):
        assert batch.captions == ["noise", "noise"]
    assert loader.bad_samples == 2 and "truncated" in loader.bad_sample_report()


# ---------------------------------------------------------------------------------------------- bad files


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _colour_folder(tmp_path / "data", ["red", "green", "blue"])
    _write(root / "cut.jpg", _image_bytes(COLORS["white"], "JPEG", (64, 64))[:300])  # truncated JPEG
    _write(root / "empty.png", b"")
    _write(root / "text.png", "I am a text file")
    _write(root / "latin.png", _image_bytes(COLORS["white"]))
    _write(root / "latin.txt", b"caf\xe9")  # caption not UTF-8
    for name in ("cut", "empty", "text"):
        _write(root / f"{name}.txt", name)
    source = build_source(root)
    (root / "blue.png").unlink()  # gone after indexing
    loader = ResumableLoader(source, batch_size=2, resolution=8)

    batches = _take(loader, 12)  # three epochs
    for batch in batches:
        assert set(batch.captions) <= {"red", "green"}
        _assert_pairs_match(batch)
    assert loader.bad_samples == 5
    report = loader.bad_sample_report()
    for name in ("cut.jpg", "empty.png", "text.png", "latin", "blue.png"):
        assert name in report


def test_nothing_readable_is_an_error_not_a_hang(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _write(tmp_path / f"{name}.png", b"")
        _write(tmp_path / f"{name}.txt", name)
    loader = ResumableLoader(build_source(tmp_path), batch_size=1, resolution=8)
    with pytest.raises(TurbokitError, match=r"2 of the 2 samples .* unreadable"):
        next(loader)


def test_unusable_datasets_fail_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "uncaptioned" / "a.png", _image_bytes(COLORS["red"]))
    _write(tmp_path / "empty.jsonl", "\n")
    _write(tmp_path / "bad.jsonl", "not json\n")
    _tar(tmp_path / "shards" / "x.tar", {"a.txt": b"caption only"})
    _write(tmp_path / "data.csv", "a,b")
    _write(tmp_path / "blank-prompts.txt", "\n \n")
    (tmp_path / "not-a-cache").mkdir()
    cases = {
        "empty": "no images found",
        "uncaptioned": "no images with captions found .* a.png needs a.txt",
        "empty.jsonl": "it is empty",
        "bad.jsonl": "1 lines left out",
        "shards": "no image \\+ .txt caption pairs",
        "missing": "not found",
        "data.csv": "cannot read training data",
        "shards/x-{0..1}.tar": "x-0.tar not found",
    }
    for name, message in cases.items():
        with pytest.raises(TurbokitError, match=message) as err:
            build_source(tmp_path / name if "{" not in name else f"{tmp_path}/{name}")
        assert "\n" not in str(err.value)
    with pytest.raises(TurbokitError, match="no prompts"):
        build_source(tmp_path / "blank-prompts.txt", synthetic=True)
    with pytest.raises(TurbokitError, match="not a synthetic latent cache"):
        build_source(tmp_path / "not-a-cache", synthetic=True)


# ---------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_resizes_crops_and_flips() -> None:
    image = Image.new("RGB", (40, 20), COLORS["red"])
    image.paste(COLORS["blue"], (20, 0, 40, 20))  # left half red, right half blue
    pixels, original_size, crop_top_left = preprocess(image, 10)
    assert pixels.shape == (3, 10, 10) and original_size == (20, 40) and crop_top_left == (0, 5)
    assert _colour(pixels[:, :, :3]) == COLORS["red"] and _colour(pixels[:, :, -3:]) == COLORS["blue"]

    rng = np.random.default_rng(0)
    crops = {preprocess(image, 10, rng, random_crop=True)[2] for _ in range(20)}
    assert len(crops) > 1 and all(top == 0 and 0 <= left <= 10 for top, left in crops)

    flips = [preprocess(image, 10, np.random.default_rng(s), random_flip=True)[0] for s in range(8)]
    assert any(torch.equal(f, pixels.flip(-1)) for f in flips) and any(torch.equal(f, pixels) for f in flips)

    panorama = Image.new("RGB", (4000, 2), COLORS["green"])  # resized only inside the crop box
    assert _colour(preprocess(panorama, 64)[0]) == COLORS["green"]


# ---------------------------------------------------------------------------------------------- order, resume, ranks


@pytest.fixture
def colours(tmp_path: Path) -> ImageFolderSource:
    root = _colour_folder(tmp_path / "colours")
    _write(root / "zz-corrupt.png", b"\x89PNG\r\n\x1a\n broken")
    _write(root / "zz-corrupt.txt", "corrupt")
    return ImageFolderSource(root)  # 7 good samples and 1 bad one


def _loader(source, **kwargs) -> ResumableLoader:
    kwargs = {"batch_size": 3, "resolution": 8, "seed": 1, "random_crop": True, "random_flip": True, **kwargs}
    return ResumableLoader(source, **kwargs)


def test_same_seed_same_batches(colours: ImageFolderSource) -> None:
    first, second = _take(_loader(colours), 4), _take(_loader(colours), 4)
    assert _same(first, second)
    other = _take(_loader(colours, seed=2), 4)
    assert [b.captions for b in other] != [b.captions for b in first]


def test_each_epoch_is_a_permutation(colours: ImageFolderSource) -> None:
    captions = [c for b in _take(_loader(colours, batch_size=4), 4) for c in b.captions]
    # 8 samples a epoch: 7 readable ones once each, and the corrupt one's replacement
    for epoch in (captions[:8], captions[8:]):
        assert set(COLORS) <= set(epoch)


@pytest.mark.parametrize("done", [1, 2, 3, 5])
def test_resume_continues_with_the_same_batches(colours: ImageFolderSource, done: int) -> None:
    reference = _loader(colours)
    uninterrupted = _take(reference, 7)
    stopped = _loader(colours)
    _take(stopped, done)
    state = json.loads(json.dumps(stopped.state_dict()))
    resumed = _loader(colours, seed=99)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 7 - done), uninterrupted[done:])  # done=2 crosses the epoch boundary (6 of 8)
    assert resumed.state_dict() == reference.state_dict()


def test_state_dict_format(colours: ImageFolderSource) -> None:
    loader = _loader(colours)
    _take(loader, 3)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["index"] == 1 and state["num_samples"] == 8 and state["seed"] == 1
    assert state["bad_indices"] == [7] and "zz-corrupt.png" in state["bad_examples"][0]


def test_changed_dataset_resumes_with_a_warning(colours: ImageFolderSource, tmp_path: Path, caplog) -> None:
    loader = _loader(colours)
    _take(loader, 2)
    smaller = ImageFolderSource(_colour_folder(tmp_path / "smaller", ["red", "green"]))
    resumed = _loader(smaller)
    with caplog.at_level(logging.WARNING, logger="turbokit"):
        resumed.load_state_dict(loader.state_dict())
    assert "changed since the checkpoint" in caplog.text
    assert set(next(resumed).captions) <= {"red", "green"}


def test_ranks_take_disjoint_slices_of_the_global_batch(colours: ImageFolderSource) -> None:
    global_batches = _take(_loader(colours, batch_size=4, random_crop=False, random_flip=False), 5)
    ranks = [_loader(colours, batch_size=2, rank=r, world_size=2, random_crop=False, random_flip=False) for r in (0, 1)]
    for whole in global_batches:
        parts = [next(rank) for rank in ranks]
        assert parts[0].captions + parts[1].captions == whole.captions
        assert torch.equal(torch.cat([parts[0].pixels, parts[1].pixels]), whole.pixels)
    positions = [{k: rank.state_dict()[k] for k in ("seed", "epoch", "index")} for rank in ranks]
    assert positions[0] == positions[1]  # one checkpoint (the main process's) resumes every process


def test_decoding_threads_give_the_same_batches(colours: ImageFolderSource) -> None:
    threaded = _loader(colours, num_workers=2)
    try:
        assert _same(_take(threaded, 4), _take(_loader(colours), 4))
        resumed = _loader(colours, num_workers=2)
        resumed.load_state_dict(threaded.state_dict())
        assert _same(_take(resumed, 3), _take(_loader(colours), 7)[4:])
        resumed.close()
    finally:
        threaded.close()


# ---------------------------------------------------------------------------------------------- synthetic latents


class _CountingTeacher:
    """The teacher, counting its calls; fails on call number `fail_at` to simulate a crash."""

    def __init__(self, pipe: TurboPipeline, fail_at: int | None = None) -> None:
        self.pipe, self.calls, self.fail_at = pipe, 0, fail_at

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.pipe(*args, **kwargs)


def test_read_prompts(tmp_path: Path) -> None:
    path = _write(tmp_path / "prompts.txt", "\ufeffa cat\n\n  a dog  \r\na bird")
    assert read_prompts(path) == ["a cat", "a dog", "a bird"]
    source = build_source(path, synthetic=True)
    assert isinstance(source, PromptSource) and source.prompts == read_prompts(path)
    with pytest.raises(TurbokitError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_synthetic_latents_are_cached_resumed_and_read_back(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pipe = TurboPipeline.from_pretrained(tiny_models["sd1"], device="cpu", dtype="fp32")
    prompts = ["a", "b", "c", "d", "e"]
    cache = tmp_path / "cache"
    settings = {"steps": 2, "guidance_scale": 3.0, "seed": 7, "batch_size": 2, "shard_size": 2}

    crashing = _CountingTeacher(pipe, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_latents(crashing, prompts, cache, **settings)
    assert sorted(p.name for p in cache.iterdir()) == ["latents-00000.safetensors", "synthetic.json"]
    with pytest.raises(TurbokitError, match="incomplete"):
        build_source(cache)

    teacher = _CountingTeacher(pipe)
    assert generate_synthetic_latents(teacher, prompts, cache, **settings) == cache
    assert teacher.calls == 2  # shards 1 and 2; shard 0 was kept
    assert not list(cache.glob(".*"))

    source = build_source(cache)
    assert isinstance(source, SyntheticLatentSource) and len(source) == 5
    for i in (0, 4):
        latents, caption = source.load(i)
        expected = pipe(prompts[i], steps=2, guidance_scale=3.0, seed=7 + i, decode=False).latents[0]
        assert caption == prompts[i]
        torch.testing.assert_close(latents, expected, atol=2e-3, rtol=2e-3)

    batch = next(ResumableLoader(source, batch_size=2, resolution=64))
    assert batch.latents.shape == (2, 4, 8, 8) and batch.pixels is None
    assert batch.original_sizes.tolist() == [[64, 64]] * 2 and batch.crop_top_lefts.tolist() == [[0, 0]] * 2
    with pytest.raises(TurbokitError, match="resolution is 128"):
        ResumableLoader(source, batch_size=2, resolution=128)

    generate_synthetic_latents(teacher, prompts, cache, **settings)
    assert teacher.calls == 2  # all reused
    with pytest.raises(TurbokitError, match=r"other settings .*steps 2 → 3"):
        generate_synthetic_latents(teacher, prompts, cache, **{**settings, "steps": 3})
    with pytest.raises(TurbokitError, match="not empty"):
        generate_synthetic_latents(teacher, prompts, tiny_models["sd1"], **settings)
