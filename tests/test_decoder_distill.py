"""`turbokit distill-decoder`: a tiny autoencoder learns a model's latents, resumes exactly, decodes in the pipeline."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from turbokit import decoder_distill, metrics
from turbokit.cli import main
from turbokit.distill.data import build_source
from turbokit.errors import InvalidRequestError, TurbokitError
from turbokit.loading import load_tiny_vae, load_vae
from turbokit.pipeline import TurboPipeline
from turbokit.recipes import training
from turbokit.tiny import save_tiny_model

TRAINED = ["--steps", "60", "--batch-size", "4", "--lr", "3e-3", "--resolution", "32", "--heldout", "4"]
FAST = decoder_distill.DecoderRecipe(steps=4, batch_size=2, resolution=32, width=8, depth=1, heldout=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny SD 2 model whose VAE's scaling factor gives unit-variance latents, as SD's does (the random
    VAE's 0.18215 would leave the decoder almost nothing to read)."""
    path = save_tiny_model(tmp_path_factory.mktemp("decoder") / "model", "sd2")
    images = write_images(path.parent / "images", 16)
    vae = load_vae(path, allow_pickle=False, dtype=torch.float32)
    pixels = decoder_distill.load_pixels(build_source(images, captions=False), 32)
    with torch.no_grad():
        std = vae.encode(pixels).latent_dist.mean.std()
    config = json.loads((path / "vae" / "config.json").read_text())
    (path / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": float(1 / std)}))
    return path


def write_images(folder, n):
    """Colour ramps, horizontal and vertical, without captions (the decoder needs none)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, 32)[None, :, None] if i % 2 else np.linspace(0, 1, 32)[:, None, None]
        ramp = (start * (1 - t) + end * t) * np.ones((32, 32, 1))
        Image.fromarray(ramp.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(model):
    """Trained through the command line into the model's vae_tiny/, where `--decoder tiny` looks."""
    out = model / "vae_tiny"
    code = main(["distill-decoder", str(model), "--data", str(model.parent / "images"), "--output-dir", str(out),
                 *TRAINED, "--small", "-q"])  # fmt: skip
    assert code == 0
    return out


def heldout_pixels(model):
    _, heldout = decoder_distill.split_heldout(build_source(model.parent / "images", captions=False), 4)
    return decoder_distill.load_pixels(heldout, 32)


def test_training_lowers_the_loss_and_learns_to_decode(model, trained):
    history = json.loads((trained / "training" / "state" / "progress.json").read_text())["history"]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    report = json.loads((trained / "report.json").read_text())
    torch.manual_seed(0)
    untrained = decoder_distill.build_tiny_autoencoder(4, 8, decoder_distill.SMALL_WIDTH, decoder_distill.SMALL_DEPTH)
    vae = load_vae(model, allow_pickle=False, dtype=torch.float32)
    before = decoder_distill.evaluate(untrained.eval(), vae, heldout_pixels(model))
    assert report["tiny_vs_images"]["psnr_db"] > before["tiny_vs_images"]["psnr_db"] + 5  # on held-out images
    assert report["tiny_vs_images"]["ssim"] > before["tiny_vs_images"]["ssim"] + 0.3


def test_pipeline_decodes_in_the_latent_space_the_trainer_used(model, trained):
    pipe = TurboPipeline.from_pretrained(model, device="cpu", dtype="fp32", tiny_vae=trained)
    pixels = heldout_pixels(model)
    latents = decoder_distill.vae_latents(pipe.vae, pixels)  # the UNet's space: what the pipeline denoises
    images = pixels / 2 + 0.5
    through_pipeline = metrics.psnr(pipe.decode(latents), images).mean()
    report = json.loads((trained / "report.json").read_text())
    assert abs(float(through_pipeline) - report["tiny_vs_images"]["psnr_db"]) < 0.01


def test_export_loads_and_generates(model, trained, tmp_path, capsys):
    tiny = load_tiny_vae(trained, torch.float32)
    assert tiny.config.latent_channels == 4 and len(tiny.config.decoder_block_out_channels) == 4  # 8× like the VAE
    pipe = TurboPipeline.from_pretrained(model, device="cpu", dtype="fp32", tiny_vae=trained)
    assert pipe("a ramp", seed=0, width=64, height=32).images[0].size == (64, 32)

    target = tmp_path / "tiny.png"
    code, err = cli(capsys, "generate", "ramp", "-m", model, "--decoder", "tiny", "--size", "64x32", "-o", target, "-q")
    assert code == 0, err
    assert Image.open(target).size == (64, 32)

    bare = save_tiny_model(tmp_path / "bare", "sd2")
    for argv, message in (
        (("-m", bare, "--decoder", "tiny"), "has no vae_tiny/ folder"),
        (("-m", model, "--decoder", "full", "--tiny-vae", trained), "contradicts"),
    ):
        code, err = cli(capsys, "generate", "x", *argv, "-o", tmp_path / "no.png", "-q")
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_report_holds_sane_psnr_and_ssim(trained):
    report = json.loads((trained / "report.json").read_text())
    assert report["heldout_images"] == 4 and report["scale_factor"] == 8
    for key in ("tiny_vs_vae", "tiny_vs_images", "vae_vs_images"):
        assert 0 < report[key]["psnr_db"] < 100 and -1 <= report[key]["ssim"] <= 1
    assert report["decode_ms_per_image"]["tiny"] > 0 and report["encoder_latent_rmse"] >= 0


def test_resume_continues_where_it_stopped(model, tmp_path, monkeypatch):
    data = "shapes:train?n=12&size=32"
    whole = decoder_distill.train_decoder(model, data, tmp_path / "whole", FAST, device="cpu", progress=False)
    monkeypatch.setattr(training, "SAVE_EVERY_S", 0.0)  # save after every step
    calls, loss = [], decoder_distill.decoder_loss

    def dies_on_the_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the session ends mid-run
        return loss(*args)

    monkeypatch.setattr(decoder_distill, "decoder_loss", dies_on_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        decoder_distill.train_decoder(model, data, tmp_path / "split", FAST, device="cpu", progress=False)
    assert not (tmp_path / "split" / "report.json").exists()
    calls.clear()
    monkeypatch.setattr(decoder_distill, "decoder_loss", lambda *args: calls.append(1) or loss(*args))
    resumed = decoder_distill.train_decoder(model, data, tmp_path / "split", FAST, device="cpu", progress=False)
    assert len(calls) == FAST.steps - 2  # only the steps the first run did not finish
    a, b = (load_file(tmp_path / run / "diffusion_pytorch_model.safetensors") for run in ("whole", "split"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert resumed["tiny_vs_images"] == whole["tiny_vs_images"]


def test_cli_bad_input_is_one_line_and_exit_2(model, trained, tmp_path, capsys):
    images, empty = model.parent / "images", tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    ok = ["--resolution", "32", "--heldout", "4"]
    for argv, message in (
        ((tmp_path / "nope", "--data", images, "--output-dir", tmp_path / "a", *ok), "model not found"),
        ((model, "--data", empty, "--output-dir", tmp_path / "a", *ok), "no images found"),
        ((model, "--data", images, "--output-dir", tmp_path / "a", *ok, "--steps", "0"), "--steps must be at least 1"),
        ((model, "--data", images, "--output-dir", tmp_path / "a", *ok, "--lr", "-1"), "--lr must be a positive"),
        ((model, "--data", images, "--output-dir", tmp_path / "a", "--resolution", "36"), "multiple of 8"),
        ((model, "--data", images, "--output-dir", tmp_path / "a", "--resolution", "32", "--heldout", "16"), "16 held"),
        ((model, "--data", images, "--output-dir", tmp_path / "taken", *ok), "not an empty folder"),
        ((model, "--data", images, "--output-dir", trained, *ok, "--steps", "61"), "other settings"),
    ):
        code, err = cli(capsys, "distill-decoder", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (message, err)
        assert not (tmp_path / "a").exists()
    # the same command again finds the finished run and leaves it as it is
    before = (trained / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = cli(capsys, "distill-decoder", model, "--data", images, "--output-dir", trained, *TRAINED, "--small")
    assert again[0] == 0
    assert (trained / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_latent_noise_trains_on_the_full_decoders_answers_too(model, tmp_path, monkeypatch):
    seen = []
    loss = decoder_distill.decoder_loss
    monkeypatch.setattr(decoder_distill, "decoder_loss", lambda *a: seen.append(a[3]) or loss(*a))
    recipe = decoder_distill.DecoderRecipe(**{**FAST.__dict__, "latent_noise": 1.0})
    data = model.parent / "images"
    report = decoder_distill.train_decoder(model, data, tmp_path / "noisy", recipe, device="cpu", progress=False)
    assert len(seen) == FAST.steps and all(pair is not None for pair in seen)
    latents, targets = seen[0]
    assert latents.shape[0] == FAST.batch_size // 2 and targets.shape[-1] == FAST.resolution  # decoded pixels
    vae = load_vae(model, allow_pickle=False, dtype=torch.float32)
    with torch.no_grad():  # the targets are the full VAE's decode of those very latents
        expected = vae.decode(latents / vae.config.scaling_factor).sample
    assert torch.allclose(targets, expected, atol=1e-5)
    assert 0 < report["tiny_vs_vae_noisy_latents"]["psnr_db"] < 100
    with pytest.raises(InvalidRequestError, match="--latent-noise"):
        decoder_distill.DecoderRecipe(latent_noise=-1.0).check()


def test_a_run_saved_before_latent_noise_existed_still_resumes(model, tmp_path):
    data = model.parent / "images"
    settings = {"model": str(model), "data": str(data), **FAST.__dict__}
    (tmp_path / "old" / "training").mkdir(parents=True)
    old = {k: v for k, v in settings.items() if k != "latent_noise"}  # as the run was saved then
    (tmp_path / "old" / "training" / "settings.json").write_text(json.dumps(old))
    decoder_distill._check_output(tmp_path / "old", settings)  # its default: the same run
    with pytest.raises(TurbokitError, match=re.escape("latent_noise 0.0 → 1.0")):
        decoder_distill._check_output(tmp_path / "old", settings | {"latent_noise": 1.0})
