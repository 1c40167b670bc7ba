"""The shapes recipe end to end at a tiny scale: every stage runs, resumes, and hands on what the next needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from turbokit.cli import main
from turbokit.errors import TurbokitError
from turbokit.pipeline import TurboPipeline
from turbokit.recipes import recipe

TINY = recipe.Budget(
    vae_steps=2,
    vae_batch=4,
    text_steps=2,
    text_batch=8,
    teacher_steps=2,
    teacher_batch=4,
    distill_steps=2,
    distill_batch=2,
    ablation_steps=1,
    eval_images=8,
    evaluator_steps=2,
    evaluator_samples=16,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    for stage in ("vae", "text", "teacher"):
        getattr(recipe, f"stage_{stage}")(root, TINY, 0, False)
    return root


def test_stages_write_loadable_models(root):
    assert json.loads((root / "vae" / "done.json").read_text())["steps"] == 2
    for part in ("text_encoder", "tokenizer", "dino"):
        assert (root / "text" / part).is_dir()
    pipe = TurboPipeline.from_pretrained(root / "teacher" / "model", dtype="fp32")
    assert pipe.family_name == "sd2" and pipe.native_size == 64
    image = pipe("a red circle on a blue background", steps=2, seed=0).images[0]
    assert image.size == (64, 64)


def test_teacher_loads_in_diffusers(root):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(root / "teacher" / "model")
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.scaling_factor != 0.18215
    assert all("CrossAttn" in block for block in pipe.unet.config.down_block_types)  # text at every level
    clip_stage = CLIPTextModel.from_pretrained(root / "text" / "text_encoder")
    tuned = dict(pipe.text_encoder.named_parameters())
    changed = [n for n, p in clip_stage.named_parameters() if not torch.equal(p, tuned[n])]
    assert changed  # the teacher stage fine-tunes the text encoder and ships its own


def test_teacher_noise_has_a_per_channel_offset():
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from turbokit.recipes.teacher import noise_schedule, teacher_loss

    class ZeroUNet(torch.nn.Module):  # predicts ε = 0, so the loss is the mean square of the noise itself
        def forward(self, noisy, timesteps, states):
            return SimpleNamespace(sample=torch.zeros_like(noisy))

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, sample_size=16)
    pixels = torch.zeros(64, 3, 16, 16)

    def loss(offset: float) -> float:
        generator = torch.Generator().manual_seed(0)
        return teacher_loss(ZeroUNet(), vae, None, pixels, generator, noise_schedule(), False, offset).item()

    # white noise alone has E[ε²] = 1; an offset of 1 adds a shared N(0, 1) per sample and channel
    assert loss(0.0) == pytest.approx(1.0, abs=0.05) and loss(1.0) == pytest.approx(2.0, abs=0.35)
    # Min-SNR-γ: weights min(SNR, γ)/SNR ≤ 1, below 1 wherever SNR > γ (the low-noise steps)
    generator = torch.Generator().manual_seed(0)
    weighted = teacher_loss(ZeroUNet(), vae, None, pixels, generator, noise_schedule(), False, 0.0, 5.0).item()
    assert 0.2 < weighted < loss(0.0) - 0.1


def test_a_stage_needs_the_one_before(tmp_path):
    with pytest.raises(TurbokitError, match="stage 'vae' has not finished"):
        recipe.stage_teacher(tmp_path, TINY, 0, False)


def test_main_is_the_shipped_configuration_and_both_the_study_base(root):
    main, both = (recipe.distill_config(root, name, TINY, 0, False) for name in ("main", "both"))
    assert (main.distill_weighting, main.teacher_steps, main.max_train_steps) == ("nfsd", 1, TINY.distill_steps)
    assert (both.distill_weighting, both.teacher_steps, both.max_train_steps) == ("exponential", 8, 1)
    assert main.export_steps == str(TINY.ablation_steps)  # the weighting-nfsd row, read from main


def test_distill_and_eval_stages(root):
    recipe.stage_distill(root, TINY, 0, False, runs=["main", "ladd", "weighting-nfsd"])
    student = root / "student" / "main" / "student"
    assert (student / "model_index.json").is_file()
    recipe.stage_eval(root, TINY, 0, False)
    rows = [json.loads(line) for line in (root / "eval" / "results.jsonl").read_text().splitlines()]
    names = {(r["name"], r["steps"]) for r in rows}
    assert ("teacher", 50) in names and ("student", 1) in names and ("ablation ladd", 1) in names
    assert ("ablation adv-only", 1) not in names and ("ablation both", 1) not in names  # never trained: no row
    nfsd = next(r for r in rows if r["name"] == "ablation weighting-nfsd")  # main's options: main at that budget
    assert nfsd["model"].endswith("student-step-1")
    assert not (root / "student" / "weighting-nfsd").exists()  # and not trained a second time
    for r in rows:
        assert 0 <= r["alignment"] <= 1 and r["fid"] >= 0 and r["images"] == 8 and r["seconds_per_image"] > 0
    recipe.stage_eval(root, TINY, 0, False)  # resumable: rows already there are not repeated
    again = (root / "eval" / "results.jsonl").read_text().splitlines()
    assert len(again) == len(rows)

    # the figures of docs/results.md
    from turbokit.recipes import report

    # one prompt: the study's three cost three times the teacher's 1–8, 25 and 50 steps
    assert report.main(["--root", str(root), "--out", str(root / "figures"), "--prompt", "a red circle"]) == 0
    table = (root / "figures" / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| teacher | 1 | 3 |")
    with Image.open(root / "figures" / "student-steps.png") as grid:
        assert grid.width >= 8 * 64 * report.SCALE  # eight step counts side by side
        assert 64 * report.SCALE <= grid.height < 2 * 64 * report.SCALE  # one row: the prompt given
    assert (root / "figures" / "student-sizes.png").is_file() and (root / "figures" / "teacher-steps.png").is_file()
    shipped = recipe.stage_ship(root, TINY, 0, False)
    from safetensors import safe_open

    with safe_open(shipped / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    assert TurboPipeline.from_pretrained(shipped)("a red circle", seed=0).images[0].size == (64, 64)
    assert (shipped / "README.md").is_file()  # a model card: what it is, how it was made
    assert (root / "shapes-evaluator" / "model.safetensors").is_file()  # the judge ships beside it


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch):
    from turbokit.recipes import autoencoder, training

    whole = autoencoder.train_vae(tmp_path / "whole", steps=4, batch_size=2, progress=False)
    monkeypatch.setattr(training, "SAVE_EVERY_S", 0.0)  # save after every step
    calls, loss = [], autoencoder.vae_loss

    def dies_on_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the session ends mid-stage
        return loss(*args, **kwargs)

    monkeypatch.setattr(autoencoder, "vae_loss", dies_on_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        autoencoder.train_vae(tmp_path / "split", steps=4, batch_size=2, progress=False)
    monkeypatch.setattr(autoencoder, "vae_loss", loss)
    resumed = autoencoder.train_vae(tmp_path / "split", steps=4, batch_size=2, progress=False)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.fixture
def evaluator(root) -> Path:
    """The eval stage's evaluator: the one test_distill_and_eval_stages trained, or trained here when this test
    runs alone."""
    folder = root / "evaluator"
    if not (folder / "model.safetensors").is_file():
        from turbokit.recipes import evaluator as evaluation

        trained = evaluation.train_evaluator(TINY.evaluator_samples, TINY.evaluator_steps, 16, seed=0, progress=False)
        trained.save(folder)
    return folder


def test_cli_eval_and_errors(root, evaluator, capsys):
    code = main(
        [
            "eval",
            str(root / "teacher" / "model"),
            "--evaluator",
            str(evaluator),
            "--steps",
            "1,2",
            "--images",
            "4",
            "--heldout-images",
            "2",
            "--guidance",
            "2",
            "--dtype",
            "fp32",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["steps"] for r in rows] == [1, 2] and all(r["guidance"] == 2 for r in rows)
    assert main(["eval", str(root / "teacher" / "model"), "--evaluator", str(root), "--images", "4"]) == 2
    assert "no evaluator" in capsys.readouterr().err
    assert main(["eval", "x", "--evaluator", str(evaluator), "--steps", "one"]) == 2
    assert main(["recipe", "shapes", "--stage", "teacher", "--root", str(root / "nowhere"), "-q"]) == 2
    assert "has not finished" in capsys.readouterr().err
    assert main(["recipe", "shapes", "--stage", "distill", "--runs", "main,adv_only", "--root", str(root)]) == 2
    assert "unknown distill run(s) ['adv_only']" in capsys.readouterr().err


def test_hard_negatives_make_the_contrastive_loss_harder_and_are_reported(root):
    from turbokit.recipes.clip import ShapesCLIP, hard_negatives, tokenize
    from turbokit.recipes.shapes import NEGATIVE_KINDS
    from turbokit.recipes.training import shapes_batch
    from turbokit.tokenizer import PAD_OPENCLIP, clip_tokenizer

    summary = json.loads((root / "text" / "done.json").read_text())["test_true_over_false_caption"]
    assert set(summary) <= set(NEGATIVE_KINDS) and all(0 <= v <= 1 for v in summary.values())
    torch.manual_seed(0)
    model, tokenizer = ShapesCLIP().eval(), clip_tokenizer(PAD_OPENCLIP)
    pixels, captions = shapes_batch("train", 3, 8, seed=1)
    negatives, kinds = hard_negatives("train", 3, 8, 1, per_image=2)
    assert len(negatives) == 16 and set(kinds) <= set(NEGATIVE_KINDS)
    assert hard_negatives("train", 3, 8, 1, per_image=2) == (negatives, kinds)  # drawn from (seed, step) alone
    with torch.no_grad():
        plain, _ = model.loss(pixels, tokenize(tokenizer, captions))
        harder, _ = model.loss(pixels, tokenize(tokenizer, captions), tokenize(tokenizer, negatives))
    assert harder > plain  # more wrong answers to rule out


def test_a_kept_root_lets_the_later_stages_run_without_the_earlier_ones(root, tmp_path):
    import shutil

    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / "results.jsonl").write_text('{"name": "teacher", "steps": 4}\n')
    kept = recipe.stage_keep(root, TINY, 0, False)
    assert (kept / "eval" / "results.jsonl").read_text() == '{"name": "teacher", "steps": 4}\n'
    (root / "eval" / "results.jsonl").unlink()
    unet = kept / "teacher" / "model" / "unet"
    assert [p.suffix for p in unet.glob("diffusion_pytorch_model*")] == [".safetensors"]
    assert not list(kept.rglob("optimizer.pt")) and not (kept / "text" / "text_encoder").exists()
    from safetensors import safe_open

    with safe_open(next(unet.glob("*.safetensors")), "pt") as weights:
        assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.float16
    new = tmp_path / "new-root"
    shutil.copytree(kept, new)
    for stage in ("vae", "text", "teacher"):  # finished: each is skipped, none needs what was left out
        getattr(recipe, f"stage_{stage}")(new, TINY, 0, False)
    config = recipe.distill_config(new, "main", TINY, 0, False)
    assert config.teacher == str(new / "teacher" / "model") and config.dino_model == str(new / "text" / "dino")
    kept_teacher = TurboPipeline.from_pretrained(new / "teacher" / "model", dtype="fp32")
    original = TurboPipeline.from_pretrained(root / "teacher" / "model", dtype="fp32")
    kwargs = dict(steps=2, seed=0)
    difference = (kept_teacher("a red circle", **kwargs).pixels - original("a red circle", **kwargs).pixels).abs()
    assert difference.max() < 4 / 255  # the fp16 rounding of the weights


KEPT_IN_REPOSITORY = Path(__file__).resolve().parents[2] / "artifacts" / "recipe-shapes"


def test_the_kept_stages_in_the_repository_continue_the_recipe(tmp_path):
    """artifacts/recipe-shapes (the kept teacher v5, docs/results.md): a root copied from it hands the distill
    stage its teacher and feature network, and the teacher draws the backgrounds and colours it is asked for."""
    import shutil

    from turbokit.models import SHAPES_EVALUATOR
    from turbokit.recipes.evaluator import ShapesEvaluator, per_attribute_accuracy, predict

    root = tmp_path / "root"
    shutil.copytree(KEPT_IN_REPOSITORY, root, ignore=shutil.ignore_patterns("README.md"))
    for stage in ("vae", "text", "teacher"):
        getattr(recipe, f"stage_{stage}")(root, TINY, 0, False)  # finished: skipped
    config = recipe.distill_config(root, "main", recipe.Budget(), 0, False)
    assert config.teacher == str(root / "teacher" / "model") and config.max_train_steps == 1000
    teacher = TurboPipeline.from_pretrained(root / "teacher" / "model", dtype="fp32")
    prompts = [
        "a red circle on a blue background",
        "a green triangle on a white background",
        "a yellow square on a black background",
        "a purple star on a gray background",
    ] * 4
    pixels = teacher(prompts, steps=4, guidance_scale=recipe.TEACHER_GUIDANCE, seed=list(range(16))).pixels
    scores = per_attribute_accuracy(predict(ShapesEvaluator.load(SHAPES_EVALUATOR), pixels), prompts)
    # measured on 300 test captions at 4 steps: background 0.985, colour 0.54 (chance 0.125); on these 16: 1.0, 0.5
    assert scores["background"] >= 0.75 and scores["colour"] >= 0.3, scores


def test_runs_reach_the_distill_stage_in_the_order_given(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "stage_distill", lambda *args, runs: calls.append(runs))
    assert main(["recipe", "shapes", "--stage", "distill", "--runs", "ladd,adv-only", "--root", str(tmp_path)]) == 0
    assert main(["recipe", "shapes", "--stage", "distill", "--root", str(tmp_path)]) == 0
    assert calls == [["ladd", "adv-only"], None]  # None: every run, in DISTILL_RUNS' order
