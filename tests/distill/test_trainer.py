"""`turbokit distill` end to end on tiny models: it trains, exports, resumes exactly, and refuses bad input early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from turbokit import TurboPipeline, precision
from turbokit.cli import main
from turbokit.distill.config import DistillConfig
from turbokit.distill.trainer import train
from turbokit.errors import TurbokitError
from turbokit.loading import load_model

# the recipe's training setting in small: bf16 autocast, EMA, a warm-up that spans a resumption at step 1
RECIPE_LIKE = dict(mixed_precision="bf16", use_ema=True, ema_decay=0.9, lr_warmup_steps=2)


def _config(tiny_models, dino, images, out: Path, **overrides) -> DistillConfig:
    values = dict(
        teacher=str(tiny_models["sd2"]),
        data=str(images),
        output_dir=str(out),
        dino_model=str(dino),
        train_batch_size=2,
        max_train_steps=2,
        checkpointing_steps=1,
        report_to="none",
        progress=False,
        learning_rate=1e-3,
        disc_learning_rate=1e-3,
    )
    values.update(overrides)
    return DistillConfig(**values)


def _unet_state(path: Path) -> dict[str, torch.Tensor]:
    return (
        load_model(path, allow_pickle=False, dtype=torch.float32, vae_dtype=torch.float32)
        .components["unet"]
        .state_dict()
    )


def test_add_trains_and_exports_a_loadable_turbo_student(tiny_models, dino, images, tmp_path):
    student_dir = train(_config(tiny_models, dino, images, tmp_path / "run"))
    teacher, student = _unet_state(tiny_models["sd2"]), _unet_state(student_dir)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # it learned something
    pipe = TurboPipeline.from_pretrained(student_dir, device="cpu", dtype="fp32")
    assert pipe("a red square", seed=0).images[0].size == (64, 64)
    from diffusers import AutoPipelineForText2Image

    theirs = AutoPipelineForText2Image.from_pretrained(student_dir)
    assert theirs.scheduler.config.timestep_spacing == "trailing"
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# the recipe's runs are bf16 + EMA + warm-up: a resumption must restore the EMA and the schedule exactly too;
# heads with a minibatch-std channel have their own shapes to checkpoint
@pytest.mark.parametrize("opts", [{}, RECIPE_LIKE, {"disc_minibatch_std": 2}])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_models, dino, images, tmp_path, opts):
    straight = train(_config(tiny_models, dino, images, tmp_path / "straight", max_train_steps=3, **opts))
    _ = train(_config(tiny_models, dino, images, tmp_path / "split", max_train_steps=1, **opts))
    resumed = train(
        _config(
            tiny_models, dino, images, tmp_path / "split", max_train_steps=3, resume_from_checkpoint="latest", **opts
        )
    )
    a, b = _unet_state(straight), _unet_state(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_a_student_exported_in_mid_run_equals_a_shorter_run(tiny_models, dino, images, tmp_path):
    # bf16 + EMA: the export must neither change the frozen parts' compute dtype nor the EMA's weights
    long = tmp_path / "long"
    train(_config(tiny_models, dino, images, long, max_train_steps=3, export_steps="2", **RECIPE_LIKE))
    short = train(_config(tiny_models, dino, images, tmp_path / "short", max_train_steps=2, **RECIPE_LIKE))
    straight = train(_config(tiny_models, dino, images, tmp_path / "straight", max_train_steps=3, **RECIPE_LIKE))
    for exported, plain in ((long / "student-step-2", short), (long / "student", straight)):
        a, b = _unet_state(exported), _unet_state(plain)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_ladd_trains_on_latents(tiny_models, images, tmp_path, family):
    cfg = DistillConfig(
        teacher=str(tiny_models[family]),
        data=str(images),
        output_dir=str(tmp_path / family),
        method="ladd",
        train_batch_size=2,
        max_train_steps=1,
        checkpointing_steps=1,
        report_to="none",
        progress=False,
    )
    assert (train(cfg) / "model_index.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "IMAGES", "--output_dir", "OUT"], "--teacher is required"),
        (
            ["--teacher", "TEACHER", "--data", "/no/such/data", "--output_dir", "OUT", "--method", "ladd"],
            "/no/such/data",
        ),
        (["--teacher", "TEACHER", "--data", "IMAGES", "--output_dir", "OUT"], "--dino_model"),
        (
            ["--teacher", "TEACHER", "--data", "IMAGES", "--output_dir", "OUT", "--method", "add", "--synthetic"],
            "--synthetic",
        ),
        (["--teacher", "/no/teacher", "--data", "IMAGES", "--output_dir", "OUT", "--method", "ladd"], "not found"),
        (["--teacher", "TEACHER", "--data", "EMPTY", "--output_dir", "OUT", "--method", "ladd"], "EMPTY"),
        (
            [
                "--teacher",
                "TEACHER",
                "--data",
                "IMAGES",
                "--output_dir",
                "OUT",
                "--method",
                "ladd",
                "--student_timesteps",
                "999,1200",
            ],
            "student_timesteps",
        ),
        (
            [
                "--teacher",
                "TEACHER",
                "--data",
                "IMAGES",
                "--output_dir",
                "OUT",
                "--dino_model",
                "IMAGES",
                "--dino_resolution",
                "8",
            ],
            "--dino_resolution",
        ),
        (
            [
                *("--teacher", "TEACHER", "--data", "IMAGES", "--output_dir", "OUT", "--method", "ladd"),
                *("--max_train_steps", "3", "--export_steps", "2,4"),
            ],
            "--export_steps must lie in [1, --max_train_steps]",
        ),
        (
            [
                *("--teacher", "TEACHER", "--data", "IMAGES", "--output_dir", "OUT", "--method", "ladd"),
                *("--disc_minibatch_std", "1"),
            ],
            "--disc_minibatch_std is a group size of at least 2",
        ),
    ],
)
def test_bad_input_is_one_line_before_heavy_work(argv, message, tiny_models, images, tmp_path, capsys):
    (tmp_path / "EMPTY").mkdir()
    subst = {
        "IMAGES": str(images),
        "OUT": str(tmp_path / "out"),
        "TEACHER": str(tiny_models["sd2"]),
        "EMPTY": str(tmp_path / "EMPTY"),
    }
    code = main(["distill", *[subst.get(a, a) for a in argv], "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert message.replace("EMPTY", str(tmp_path / "EMPTY")) in err
    assert "Traceback" not in err


def test_lora_trains_only_the_adapter_and_exports_it(tiny_models, dino, images, tmp_path):
    student_dir = train(
        _config(tiny_models, dino, images, tmp_path / "lora", use_lora=True, lora_rank=4, max_train_steps=1)
    )
    assert (student_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    teacher, merged = _unet_state(tiny_models["sd2"]), _unet_state(student_dir)
    assert set(teacher) == set(merged)  # a plain UNet, adapter folded in
    changed = [k for k in teacher if not torch.equal(teacher[k], merged[k])]
    assert changed and all("attn" in k for k in changed)  # only the attention projections LoRA targets
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd2"])
    pipe.load_lora_weights(student_dir / "lora")  # diffusers reads the LoRA as its own format


def test_tensorboard_gets_losses_grad_norms_and_validation_images(tiny_models, dino, images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        _config(
            tiny_models,
            dino,
            images,
            tmp_path / "tb",
            report_to="tensorboard",
            logging_steps=1,
            validation_steps=2,
            use_ema=True,
            ema_decay=0.5,
        )
    )
    events = EventAccumulator(str(next((tmp_path / "tb" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {
        "loss/discriminator",
        "loss/generator",
        "loss/distillation",
        "loss/r1",
        "disc/accuracy_real",
        "disc/accuracy_fake",
        "grad_norm/student",
        "grad_norm/discriminator",
    }
    assert expected <= scalars
    assert {"validation/1_steps", "validation/4_steps"} <= set(events.Tags()["images"])


def test_precision_accumulation_checkpointing_and_pruning(tiny_models, dino, images, tmp_path):
    out = tmp_path / "opts"
    train(
        _config(
            tiny_models,
            dino,
            images,
            out,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            gradient_accumulation_steps=2,
            max_train_steps=3,
            checkpoints_total_limit=1,
            teacher_guidance_scale="2,4",
            distill_weighting="sds",
        )
    )
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not list(out.glob(".checkpoint-*"))  # no partial saves left behind


def test_single_file_export_round_trips(tiny_models, dino, images, tmp_path):
    student_dir = train(
        _config(
            tiny_models,
            dino,
            images,
            tmp_path / "sf",
            export_single_file=True,
            max_train_steps=1,
            distill_weighting="nfsd",
        )
    )
    single = student_dir.with_suffix(".safetensors")
    folder, from_file = _unet_state(student_dir), _unet_state(single)
    for key in folder:
        torch.testing.assert_close(from_file[key], folder[key], atol=2e-3, rtol=1e-2)  # fp16 file
    pipe = TurboPipeline.from_pretrained(single, device="cpu", dtype="fp32")
    assert pipe.family_name == "sd2" and pipe.default_sampler == "euler"


def test_sdxl_add_with_micro_conditioning(tiny_models, dino, images, tmp_path):
    student_dir = train(
        _config(tiny_models, dino, images, tmp_path / "xl", teacher=str(tiny_models["sdxl"]), max_train_steps=1)
    )
    pipe = TurboPipeline.from_pretrained(student_dir, device="cpu", dtype="fp32")
    assert pipe.family_name == "sdxl" and pipe.default_sampler == "euler_a"


def test_ladd_on_synthetic_teacher_latents(tiny_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green star\n")
    cfg = DistillConfig(
        teacher=str(tiny_models["sd2"]),
        data=str(prompts),
        output_dir=str(tmp_path / "syn"),
        method="ladd",
        synthetic=True,
        synthetic_steps=2,
        num_synthetic_samples=4,
        train_batch_size=2,
        max_train_steps=2,
        checkpointing_steps=2,
        report_to="none",
        progress=False,
    )
    assert cfg.distill_lambda_value == 0.0  # LADD on synthetic data: adversarial loss only
    assert (train(cfg) / "model_index.json").is_file()
    assert (tmp_path / "syn" / "synthetic-cache").is_dir()


def test_a_v_prediction_student_of_an_epsilon_teacher_says_so_and_samples_alike_in_diffusers(
    tiny_models, dino, images, tmp_path
):
    from diffusers import StableDiffusionPipeline

    cfg = _config(tiny_models, dino, images, tmp_path / "v", student_prediction_type="v_prediction", teacher_steps=2)
    student_dir = train(cfg)
    teacher_scheduler = json.loads((Path(tiny_models["sd2"]) / "scheduler" / "scheduler_config.json").read_text())
    assert teacher_scheduler["prediction_type"] == "epsilon"
    theirs = StableDiffusionPipeline.from_pretrained(student_dir, safety_checker=None)
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(
        "a red square",
        num_inference_steps=1,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    ours = TurboPipeline.from_pretrained(student_dir, device="cpu", dtype="fp32")("a red square", seed=3).pixels
    assert (expected - ours.float()).abs().max() < 2 / 255
    with pytest.raises(TurbokitError, match="Stability's layout"):
        DistillConfig(**{**vars(cfg), "export_single_file": True}).validate()


def test_emulated_bf16_on_the_cpu_is_warned_about(tiny_models, tmp_path, monkeypatch, capsys):
    """bf16 without the hardware is 14x slower than fp32: the user hears it before a long run starts."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    argv = [
        "distill",
        "--method",
        "ladd",
        "--teacher",
        str(tiny_models["sd2"]),
        "--data",
        str(tmp_path / "x"),
        "--output_dir",
    ]
    assert main([*argv, str(tmp_path / "out"), "--mixed_precision", "bf16", "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert "emulated" in err and "--mixed_precision no" in err and "not found" in err
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(mixed_precision="no")  # the failed run left no process-wide bf16 setting behind
    AcceleratorState._reset_state()


def test_the_student_can_start_from_another_model(tiny_models, dino, images, tmp_path):
    """--student_init: train a finished student further (or fine-tune a released Turbo model) instead of
    starting again from the teacher."""
    first = train(_config(tiny_models, dino, images, tmp_path / "first", student_prediction_type="v_prediction"))
    with pytest.raises(TurbokitError, match="predicts v_prediction but the student is to predict epsilon"):
        train(_config(tiny_models, dino, images, tmp_path / "eps", student_init=str(first)))
    with pytest.raises(TurbokitError, match="not the teacher's architecture"):
        train(_config(tiny_models, dino, images, tmp_path / "xl", student_init=str(tiny_models["sdxl"])))
    frozen = train(  # next to no learning: the export is the model it started from, not the teacher
        _config(
            tiny_models,
            dino,
            images,
            tmp_path / "again",
            student_init=str(first),
            student_prediction_type="v_prediction",
            learning_rate=1e-12,
            max_train_steps=1,
        )
    )
    start, end, teacher = _unet_state(first), _unet_state(frozen), _unet_state(tiny_models["sd2"])
    for key in start:
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=1e-9, msg=key)
    assert max((start[k] - teacher[k]).abs().max() for k in start) > 1e-4
