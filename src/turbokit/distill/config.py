"""Every setting of a distillation run, in one dataclass, with flags named as in diffusers' training examples.

`turbokit distill --teacher T --data D --output_dir O [--flag value ...] [--config run.yaml]`:
flags accept underscores or dashes; a --config file (YAML or JSON, same keys) sets defaults that
flags on the command line override. Values the paper leaves open are chosen here and documented
beside the field (see also docs/distill.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from turbokit.distill.augment import parse_policy
from turbokit.distill.losses import DEFAULT_R1_GAMMA, NFSD_GUIDANCE_SCALE
from turbokit.errors import TurbokitError

if TYPE_CHECKING:
    from turbokit.loading import LoadedModel

METHODS = ("add", "ladd")
WEIGHTINGS = ("exponential", "sds", "nfsd")


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class DistillConfig:
    # --- what to distil, from what data, to where
    teacher: str = _opt(
        "", "teacher model: diffusers folder, .safetensors file or hub id (the student starts as a copy)"
    )
    student_init: str = _opt(
        "",
        "start the student from this model's UNet instead of the teacher's: a finished student to train further, "
        "or a released Turbo model to fine-tune (the teacher's architecture and the student's prediction type)",
    )
    data: str = _opt(
        "",
        "image folder with .txt captions, a .jsonl of {image, text}, .tar shards, or a prompts file with --synthetic",
    )
    output_dir: str = _opt("", "where checkpoints, logs and the exported student go")
    method: str = _opt(
        "add",
        "add: DINOv2 discriminator in pixel space (the paper); ladd: teacher-feature discriminator on latents",
        choices=METHODS,
    )
    synthetic: bool = _opt(
        False, "ladd: train on latents the teacher generates from the prompts in --data (cached to disk)"
    )
    synthetic_steps: int = _opt(25, "teacher steps per synthetic sample")
    synthetic_guidance_scale: float = _opt(7.0, "teacher CFG scale for synthetic samples")
    num_synthetic_samples: int = _opt(0, "synthetic samples to generate (0: one per prompt)")
    dino_model: str = _opt(
        "", "add: local folder of a DINOv2 model (facebook/dinov2-small) for the discriminator's features"
    )
    dino_resolution: int = _opt(224, "add: pixels the images are resized to for the DINOv2 features (paper: 224)")
    resolution: int = _opt(0, "training resolution in pixels (0: the teacher's native size)")
    # --- the method (ADD paper values where it gives them)
    student_timesteps: str = _opt(
        "999,749,499,249",
        "student timesteps τ_1..τ_N, each sample drawing one uniformly (paper: N = 4, trailing spacing); a "
        "timestep listed twice is drawn twice as often",
    )
    student_prediction_type: str = _opt(
        "teacher",
        "what the student's UNet predicts: teacher (the same as the teacher) | epsilon | v_prediction | sample; "
        "the exported scheduler config says which",
        choices=("teacher", "epsilon", "v_prediction", "sample"),
    )
    zero_terminal_snr: bool = _opt(
        True, "zero terminal SNR: the student's input at s = 999 is pure noise, as at inference (betas kept)"
    )
    distill_weighting: str = _opt(
        "exponential", "c(t) of the distillation loss: exponential (α_t) | sds | nfsd", choices=WEIGHTINGS
    )
    distill_space: str = _opt(
        "auto",
        "distillation loss in pixel (paper) or latent space; auto: pixel for add, latent for ladd",
        choices=("auto", "pixel", "latent"),
    )
    distill_lambda: float = _opt(
        -1.0, "λ weighting L_distill (paper 2.5); -1: 2.5, or 0 for ladd --synthetic (LADD drops it)"
    )
    adversarial_weight: float = _opt(1.0, "weight of L_adv^G (0 = distillation-only ablation)")
    teacher_guidance_scale: str = _opt(
        "1.0",
        "teacher CFG for the distillation target: a value or a uniform range 'lo,hi' (1 = none); "
        "nfsd takes --nfsd_guidance_scale instead",
    )
    nfsd_guidance_scale: float = _opt(
        NFSD_GUIDANCE_SCALE, "s, the CFG scale on NFSD's condition term δ_C (Katzir et al.: 7.5); nfsd only"
    )
    teacher_timestep_range: str = _opt("20,980", "teacher timesteps t ~ U[lo, hi) for re-noising x̂ (paper: U[0, T))")
    teacher_steps: int = _opt(
        1,
        "teacher sampler steps (DDIM, from t down to 0) that make the distillation target x̂₀ (paper: 1); more "
        "for a teacher whose one-step x̂₀ is noisy",
    )
    r1_gamma: float = _opt(DEFAULT_R1_GAMMA, "γ of the R1 penalty on each discriminator head's inputs")
    disc_conditioning: str = _opt(
        "text+image",
        "discriminator projection conditioning: none | text | text+image (add)",
        choices=("none", "text", "text+image"),
    )
    disc_image_condition: str = _opt(
        "all",
        "add, text+image: which samples the discriminator conditions on the real image's embedding: all (ADD as "
        "written) | seen (only where the student's input holds some of that image; not at a zero-SNR s = 999, "
        "whose input is pure noise: there the embedding names an image the student cannot know)",
        choices=("all", "seen"),
    )
    disc_augment: str = _opt(
        "none",
        "add: differentiable augmentation of the discriminator's images: none | translation | cutout, comma-separated "
        "(StyleGAN-T's DiffAugment without colour)",
    )
    disc_minibatch_std: int = _opt(
        0,
        "group size of a minibatch-std channel before each discriminator head's output (StyleGAN), so that the "
        "heads see how varied the student's samples are; 0: off, as in ADD",
    )
    ladd_noise_mean: float = _opt(1.0, "ladd: logit-normal location m of the discriminator's re-noising level")
    ladd_noise_std: float = _opt(1.0, "ladd: logit-normal scale s")
    # --- optimisation
    train_batch_size: int = _opt(4, "images per process per step")
    max_train_steps: int = _opt(1000, "optimizer steps")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(1e-5, "student learning rate")
    disc_learning_rate: float = _opt(2e-5, "discriminator heads' learning rate")
    adam_beta1: float = _opt(0.9, "student AdamW β1")
    adam_beta2: float = _opt(0.999, "student AdamW β2")
    disc_adam_beta1: float = _opt(0.0, "discriminator AdamW β1 (GAN practice: 0)")
    disc_adam_beta2: float = _opt(0.99, "discriminator AdamW β2")
    adam_weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping of each model's own parameters (0: off)")
    lr_scheduler: str = _opt("constant_with_warmup", "diffusers LR schedule name")
    lr_warmup_steps: int = _opt(0, "warm-up steps")
    use_lora: bool = _opt(False, "train a LoRA (peft) instead of the full student")
    lora_rank: int = _opt(64, "LoRA rank")
    use_ema: bool = _opt(False, "keep an EMA of the student (exported instead of the raw weights)")
    ema_decay: float = _opt(
        0.9999,
        "EMA decay's ceiling: diffusers' EMAModel ramps it as (1 + step) / (10 + step), so 0.999 is reached only "
        "after ~9000 steps (at step 1000 the decay is 0.991 whatever the ceiling above it)",
    )
    mixed_precision: str = _opt("no", "no | fp16 | bf16 (accelerate)", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "recompute student activations in backward (less memory)")
    seed: int = _opt(0, "seed of data order, noise and initialisation")
    dataloader_num_workers: int = _opt(0, "threads decoding images (the next batch is prepared while training)")
    # --- bookkeeping
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int = _opt(0, "keep only the newest N checkpoints (0: all)")
    resume_from_checkpoint: str = _opt("", "'latest' or a checkpoint folder to continue from")
    report_to: str = _opt(
        "tensorboard", "tensorboard | wandb | all | none", choices=("tensorboard", "wandb", "all", "none")
    )
    logging_steps: int = _opt(10, "log losses every N steps")
    validation_steps: int = _opt(0, "log validation images (1 and 4 steps) every N steps (0: off)")
    validation_prompts: str = _opt(
        "a photo of a cat|a red circle on a blue background", "'|'-separated prompts for validation"
    )
    export_steps: str = _opt(
        "",
        "also export the student at these steps (comma-separated) to OUTPUT/student-step-N; with a constant "
        "learning rate it equals a run of N steps",
    )
    export_single_file: bool = _opt(False, "also export the student as one .safetensors in Stability's layout")
    allow_pickle: bool = _opt(False, "allow pickle checkpoints for the teacher (only if trusted)")
    progress: bool = _opt(True, "show a progress bar")

    @property
    def student_timestep_list(self) -> list[int]:
        return _ints(self.student_timesteps, "student_timesteps")

    @property
    def disc_augment_policy(self) -> tuple[str, ...]:
        try:
            return parse_policy(self.disc_augment)
        except ValueError as error:
            raise TurbokitError(f"--disc_augment: {error}") from None

    @property
    def export_step_list(self) -> list[int]:
        return _ints(self.export_steps, "export_steps")

    @property
    def guidance_range(self) -> tuple[float, float]:
        lo, hi = _pair(self.teacher_guidance_scale, "teacher_guidance_scale")
        return lo, hi

    @property
    def teacher_t_range(self) -> tuple[int, int]:
        lo, hi = _pair(self.teacher_timestep_range, "teacher_timestep_range")
        return int(lo), int(hi)

    @property
    def distill_lambda_value(self) -> float:
        if self.distill_lambda >= 0:
            return self.distill_lambda
        return 0.0 if (self.method == "ladd" and self.synthetic) else 2.5

    def student_prediction(self, teacher: LoadedModel) -> str:
        """What the student's UNet outputs: the teacher's parameterisation unless --student_prediction_type says."""
        if self.student_prediction_type == "teacher":
            return teacher.components["scheduler"].config.get("prediction_type", "epsilon")
        return self.student_prediction_type

    @property
    def distill_in_pixels(self) -> bool:
        return self.distill_space == "pixel" or (self.distill_space == "auto" and self.method == "add")

    def validate(self) -> None:
        """Catch impossible settings before any heavy work (one clear line each)."""
        for name in ("teacher", "data", "output_dir"):
            if not getattr(self, name):
                raise TurbokitError(f"--{name} is required")
        for f in dataclasses.fields(self):  # argparse checks these on the command line; a config file or code may not
            if (choices := f.metadata.get("choices")) and getattr(self, f.name) not in choices:
                allowed = " or ".join([", ".join(choices[:-1]), choices[-1]])
                raise TurbokitError(f"--{f.name} is {allowed}, not {getattr(self, f.name)!r}")
        if self.synthetic and self.method != "ladd":
            raise TurbokitError(
                "--synthetic trains on teacher latents, which only --method ladd can use (add needs pixels)"
            )
        if self.method == "add" and not self.dino_model:
            raise TurbokitError(
                "--method add needs --dino_model PATH (a local DINOv2 folder, e.g. facebook/dinov2-small)"
            )
        if self.method == "add" and self.dino_model and not Path(self.dino_model).is_dir():
            raise TurbokitError(f"--dino_model {self.dino_model}: folder not found")
        if self.dino_resolution < 32:
            raise TurbokitError(f"--dino_resolution must be at least 32 pixels, not {self.dino_resolution}")
        if self.distill_space == "pixel" and self.method == "ladd":
            raise TurbokitError(
                "--distill_space pixel needs VAE decodes that --method ladd exists to avoid; use latent"
            )
        if self.method == "ladd" and self.disc_conditioning == "text+image":
            self.disc_conditioning = "text"  # LADD conditions on text and noise level; there is no image encoder
        if self.disc_image_condition == "seen" and "image" not in self.disc_conditioning.split("+"):
            raise TurbokitError("--disc_image_condition seen needs --method add with --disc_conditioning text+image")
        if self.disc_augment_policy and self.method != "add":
            raise TurbokitError("--disc_augment applies to --method add's pixel discriminator only")
        if self.disc_minibatch_std < 0 or self.disc_minibatch_std == 1:
            raise TurbokitError(
                f"--disc_minibatch_std is a group size of at least 2 (0: off), not {self.disc_minibatch_std}"
            )
        steps = self.student_timestep_list
        if not steps or any(not 0 <= t <= 999 for t in steps):
            raise TurbokitError(f"--student_timesteps must be integers in [0, 999], got {self.student_timesteps}")
        lo, hi = self.teacher_t_range
        if not 0 <= lo < hi <= 1000:
            raise TurbokitError(
                f"--teacher_timestep_range must be 'lo,hi' with 0 <= lo < hi <= 1000, got {self.teacher_timestep_range}"
            )
        if self.export_single_file and self.student_prediction_type not in ("teacher", "epsilon"):
            raise TurbokitError(
                "--export_single_file writes Stability's layout, which cannot say that the student predicts "
                f"{self.student_prediction_type}: export the diffusers folder only"
            )
        if self.teacher_steps < 1:
            raise TurbokitError(f"--teacher_steps must be at least 1, got {self.teacher_steps}")
        if self.teacher_steps > 1 and self.distill_weighting == "nfsd":
            raise TurbokitError(
                "--teacher_steps > 1 makes an x̂₀ target; --distill_weighting nfsd distils the teacher's score "
                "at t instead: use exponential or sds"
            )
        if self.nfsd_guidance_scale < 0:
            raise TurbokitError(f"--nfsd_guidance_scale must be >= 0, got {self.nfsd_guidance_scale}")
        g_lo, g_hi = self.guidance_range
        if g_lo < 1 or g_hi < g_lo:
            raise TurbokitError(
                f"--teacher_guidance_scale must be >= 1 (1 = no guidance), got {self.teacher_guidance_scale}"
            )
        positive = ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise TurbokitError(f"--{name} must be at least 1")
        if any(not 1 <= n <= self.max_train_steps for n in self.export_step_list):
            raise TurbokitError(f"--export_steps must lie in [1, --max_train_steps], got {self.export_steps}")
        if self.learning_rate <= 0 or self.disc_learning_rate <= 0:
            raise TurbokitError("learning rates must be positive")
        if self.resolution and self.resolution % 8:
            raise TurbokitError(f"--resolution must be a multiple of 8, got {self.resolution}")


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise TurbokitError(f"--{name} must be comma-separated integers, got {text!r}") from err


def _pair(text: str, name: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError as err:
        raise TurbokitError(f"--{name} must be a number or 'lo,hi', got {text!r}") from err
    if len(values) not in (1, 2):
        raise TurbokitError(f"--{name} must be a number or 'lo,hi', got {text!r}")
    return values[0], values[-1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, `--snake_case` and `--dash-case` both accepted."""
    parser.add_argument("--config", default=None, help="YAML or JSON file with any of these settings")
    for f in dataclasses.fields(DistillConfig):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*flags, type=type(f.default), choices=f.metadata.get("choices"), **kwargs)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults ← --config file ← command-line flags."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_config_file(Path(args.config)))
    values.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if getattr(args, f.name) is not None}
    )
    return DistillConfig(**values)


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TurbokitError(f"--config {path}: file not found")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise TurbokitError(f"--config {path}: cannot parse it ({err.__class__.__name__})") from err
    if not isinstance(data, dict):
        raise TurbokitError(f"--config {path}: expected a mapping of setting names to values")
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TurbokitError(f"--config {path}: unknown settings {', '.join(unknown)}")
    return data
