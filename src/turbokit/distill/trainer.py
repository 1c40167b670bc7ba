"""`turbokit distill`: the training loop around `distill_step`, on accelerate.

accelerate handles devices, processes (DDP, FSDP, DeepSpeed via `accelerate launch`), mixed
precision, gradient accumulation, trackers and checkpoint state; this file only wires the models,
data and optimizers together and runs the loop. The step itself lives in `turbokit.distill.step`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.schedulers import EulerDiscreteScheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from turbokit import sampling
from turbokit.distill import data as distill_data
from turbokit.distill.checkpoint import resolve_resume, save_checkpoint
from turbokit.distill.config import DistillConfig
from turbokit.distill.discriminator import build_discriminator
from turbokit.distill.export import export_student
from turbokit.distill.feature_networks import DinoFeatures
from turbokit.distill.losses import NFSD_NEGATIVE_PROMPT
from turbokit.distill.step import StepBatch, StepModels, distill_step
from turbokit.errors import TurbokitError
from turbokit.families import Conditioning, SDFamily, SDXLFamily, build_family
from turbokit.loading import LoadedModel, load_model
from turbokit.precision import training_mixed_precision

log = logging.getLogger("turbokit")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class TrainState:
    """The loop's own resumable state: step, noise generator, data position (registered with accelerate)."""

    def __init__(self, seed: int, loader: distill_data.ResumableLoader) -> None:
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = loader

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state(), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.loader.load_state_dict(state["loader"])


def _family(model: LoadedModel) -> SDFamily | SDXLFamily:
    return build_family(model.family, model.components, bool(model.extra.get("force_zeros_for_empty_prompt", True)))


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _sdxl_time_ids(
    batch: distill_data.Batch, size: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """SDXL micro-conditioning per sample: (original h, w, crop top, left, target h, w); cached teacher
    latents have no original image, so their original size is the target size."""
    n = len(batch.captions)
    original = batch.original_sizes.clone()
    original[(original == 0).all(dim=1)] = torch.tensor(size)
    target = torch.tensor(size).expand(n, 2)
    return torch.cat([original, batch.crop_top_lefts, target], dim=1).to(device, dtype)


def ladd_timesteps(n: int, gen: torch.Generator, alphas_cumprod: Tensor, mean: float, std: float) -> Tensor:
    """LADD's re-noising levels: u ~ logit-normal(m, s) in rectified-flow time, mapped to the VP timestep of
    equal signal-to-noise ratio (SNR_RF(u) = ((1 − u)/u)², SNR_VP(t) = ᾱ_t/(1 − ᾱ_t))."""
    u = torch.sigmoid(mean + std * torch.randn(n, generator=gen)).clamp(1e-4, 1 - 1e-4)
    log_snr_rf = 2 * torch.log((1 - u) / u)
    log_snr_vp = torch.log(alphas_cumprod / (1 - alphas_cumprod)).float()
    return (log_snr_vp.view(1, -1) - log_snr_rf.view(-1, 1)).abs().argmin(dim=1)


def train(cfg: DistillConfig) -> Path:
    """Distil `cfg.teacher` into a Turbo student; returns the exported student folder."""
    cfg.validate()
    try:
        return _train(cfg)
    finally:
        # accelerate keeps its settings (mixed precision, ...) process-wide; forget them, after a failed run
        # too, so that a later train() in the same process may use others. The process group is kept.
        AcceleratorState._reset_state()


def _initial_student(cfg: DistillConfig, teacher: LoadedModel) -> nn.Module:
    """The student's UNet in fp32: a copy of the teacher's (the paper), or `--student_init`'s."""
    unet_t = teacher.components["unet"]
    if not cfg.student_init:
        return copy.deepcopy(unet_t).float()
    init = load_model(cfg.student_init, allow_pickle=cfg.allow_pickle, dtype=torch.float32, vae_dtype=torch.float32)
    unet = init.components["unet"].float()
    theirs, ours = unet.state_dict(), unet_t.state_dict()
    if theirs.keys() != ours.keys() or any(theirs[k].shape != ours[k].shape for k in ours):
        raise TurbokitError(f"--student_init {cfg.student_init}: its UNet is not the teacher's architecture")
    predicts = init.components["scheduler"].config.get("prediction_type", "epsilon")
    wanted = cfg.student_prediction(teacher)
    if predicts != wanted:
        raise TurbokitError(
            f"--student_init {cfg.student_init} predicts {predicts} but the student is to predict {wanted}: "
            f"pass --student_prediction_type {predicts}"
        )
    return unet


def _train(cfg: DistillConfig) -> Path:
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise TurbokitError(
            "launched as several processes that did not join one process group (each would train alone); "
            "on CPUs set ACCELERATE_USE_CPU=true, on GPUs check the accelerate config"
        )
    if cfg.use_lora and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise TurbokitError("--use_lora is supported with DDP, not with FSDP or DeepSpeed (LoRA fits one GPU)")
    device, weight_dtype = accelerator.device, _weight_dtype(cfg.mixed_precision)
    if cfg.mixed_precision == "bf16" and device.type == "cpu" and training_mixed_precision(device) != "bf16":
        log.warning(
            "this CPU has no native bf16 (AVX512-BF16 or AMX), so --mixed_precision bf16 is emulated and far "
            "slower than fp32 (14x in the shapes recipe on an AVX2 CPU); pass --mixed_precision no"
        )

    # Data first: a bad path or an empty dataset fails before any model is loaded.
    source = distill_data.build_source(cfg.data, synthetic=cfg.synthetic)
    dino = None  # small: loaded first so that a wrong path fails early
    if cfg.method == "add":
        dino = DinoFeatures.from_pretrained(cfg.dino_model, image_size=cfg.dino_resolution)
    teacher = load_model(cfg.teacher, allow_pickle=cfg.allow_pickle, dtype=torch.float32, vae_dtype=torch.float32)
    c = teacher.components
    unet_t, vae = c["unet"], c["vae"]
    resolution = cfg.resolution or unet_t.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    resume = resolve_resume(out, cfg.resume_from_checkpoint)
    _check_resume_family(resume, teacher.family)
    if cfg.synthetic:
        source = _synthetic_source(cfg, teacher, resolution, accelerator)
    loader = distill_data.ResumableLoader(
        source,
        batch_size=cfg.train_batch_size,
        resolution=resolution,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=cfg.dataloader_num_workers,
    )

    # Frozen parts in the compute dtype; the student keeps fp32 master weights (autocast does the rest).
    student = _initial_student(cfg, teacher).train()
    for module in [unet_t, vae, c["text_encoder"], c.get("text_encoder_2")]:
        if module is not None:
            module.requires_grad_(False).eval().to(device, weight_dtype)
    if weight_dtype == torch.float16 and vae.config.get("force_upcast", True):
        vae.to(torch.float32)  # SD/SDXL VAEs overflow in fp16
    family = _family(teacher)
    if cfg.use_lora:
        from peft import LoraConfig

        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS))
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student_params = [p for p in student.parameters() if p.requires_grad]

    set_seed(cfg.seed)  # the heads' random initialisation: the same run gives the same weights
    disc = build_discriminator(
        cfg.method,
        dino=dino,
        teacher_unet=unet_t,
        text_dim=_pooled_dim(teacher),
        conditioning=cfg.disc_conditioning,
        minibatch_std=cfg.disc_minibatch_std,
    ).to(device)
    opt_g = torch.optim.AdamW(
        student_params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay
    )
    opt_d = torch.optim.AdamW(
        disc.trainable_parameters(),
        lr=cfg.disc_learning_rate,
        betas=(cfg.disc_adam_beta1, cfg.disc_adam_beta2),
        weight_decay=cfg.adam_weight_decay,
    )
    # accelerate steps a prepared schedule once per process, hence the scaled counts for the student's.
    n, warm = cfg.max_train_steps, cfg.lr_warmup_steps
    sched_g = get_scheduler(
        cfg.lr_scheduler,
        opt_g,
        num_warmup_steps=warm * accelerator.num_processes,
        num_training_steps=n * accelerator.num_processes,
    )
    sched_d = get_scheduler(cfg.lr_scheduler, opt_d, num_warmup_steps=warm, num_training_steps=n)
    # Only the student goes through accelerate (DDP / FSDP / DeepSpeed wrap exactly one model that way);
    # the discriminator heads are small, replicated, and averaged across processes in d_update.
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader is prepared, so DeepSpeed is told
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    student, opt_g, sched_g = accelerator.prepare(student, opt_g, sched_g)
    for part in (disc.heads, opt_d, sched_d):
        accelerator.register_for_checkpointing(part)

    state = TrainState(cfg.seed + accelerator.process_index, loader)
    accelerator.register_for_checkpointing(state)
    ema = None
    if cfg.use_ema:
        ema = EMAModel(student_params, decay=cfg.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    # Restore only now, after every optimizer and scheduler exists (restoring earlier silently loses them).
    if resume is not None:
        accelerator.load_state(str(resume))
        log.info(f"resumed from {resume} at step {state.step}")

    alphas_cumprod = EulerDiscreteScheduler.from_config(c["scheduler"].config).alphas_cumprod.to(device)
    models = StepModels(
        student=student,
        teacher=unet_t,
        vae=vae,
        disc=disc,
        alphas_cumprod=alphas_cumprod,
        prediction_type=c["scheduler"].config.get("prediction_type", "epsilon"),
        scaling_factor=vae.config.scaling_factor,
        student_prediction_type=cfg.student_prediction(teacher),
    )
    uncond_cache: dict[int, Conditioning] = {}
    nfsd = cfg.distill_weighting == "nfsd"

    def uncond(n: int) -> Conditioning:
        if n not in uncond_cache:
            empty = family.encode([""] * n)
            uncond_cache[n] = empty.zeros_like() if family.zero_negative else empty
        return uncond_cache[n]

    grad_norms: dict[str, float] = {}

    head_params = disc.trainable_parameters()

    def d_update(loss: Tensor) -> None:
        # The D graph never reaches the student (x̂ is detached), so a plain backward is the whole story.
        (loss / cfg.gradient_accumulation_steps).backward()
        if not accelerator.sync_gradients:
            return
        _average_across_processes(head_params, accelerator.num_processes)
        norm = torch.nn.utils.clip_grad_norm_(head_params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        grad_norms["grad_norm/discriminator"] = float(norm)
        opt_d.step()
        sched_d.step()
        opt_d.zero_grad(set_to_none=True)

    def g_update(loss: Tensor) -> None:
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            # The prepared model's own parameters: what accelerate clips under FSDP and DeepSpeed too.
            grad_norms["grad_norm/student"] = _clip(accelerator, list(student.parameters()), cfg.max_grad_norm)
        opt_g.step()
        sched_g.step()
        opt_g.zero_grad(set_to_none=True)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        run = {"family": teacher.family, "teacher": cfg.teacher, "method": cfg.method}
        (out / "run.json").write_text(json.dumps(run, indent=2))
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("turbokit-distill", config={k: v for k, v in vars(cfg).items() if v is not None})
    bar = tqdm(
        total=cfg.max_train_steps,
        initial=state.step,
        disable=not (cfg.progress and accelerator.is_main_process),
        desc="distill",
        unit="step",
    )
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    export_steps = set(cfg.export_step_list) - {cfg.max_train_steps}  # the last step's export is the final one

    def export(folder: Path) -> None:
        """The student as a diffusers pipeline folder, with the EMA weights when there are."""
        if ema is not None:
            ema.store(student_params)
            ema.copy_to(student_params)
        full_state = accelerator.get_state_dict(student)  # gathers FSDP / ZeRO-3 shards; every process takes part
        if accelerator.is_main_process:
            unet = accelerator.unwrap_model(student)
            if sharded:
                unet = copy.deepcopy(unet_t).float()
                unet.load_state_dict(full_state)
            export_student(folder, teacher, unet, cfg)
        if ema is not None:
            ema.restore(student_params)

    batches = iter(loader)
    while state.step < cfg.max_train_steps:
        for _ in range(cfg.gradient_accumulation_steps):
            raw = next(batches)
            with accelerator.accumulate(student), accelerator.autocast():
                batch = _prepare_batch(raw, family, models, teacher.family, state.generator, uncond, device, nfsd)
                disc_inputs = _disc_inputs_fn(cfg, disc, models, state.generator)
                logs = distill_step(batch, models, cfg, state.generator, disc_inputs, d_update, g_update)
        state.step += 1
        if ema is not None:
            ema.step(student_params)
        bar.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == cfg.max_train_steps:
            logs.update(grad_norms, **{"lr/student": sched_g.get_last_lr()[0], "data/bad_samples": loader.bad_samples})
            accelerator.log(logs, step=state.step)
            bar.set_postfix(d=f"{logs['loss/discriminator']:.3f}", g=f"{logs['loss/generator']:.3f}")
        if state.step % cfg.checkpointing_steps == 0 or state.step == cfg.max_train_steps:
            save_checkpoint(accelerator, out, state.step, cfg.checkpoints_total_limit)
        if state.step in export_steps:
            export(out / f"student-step-{state.step}")
        if (
            cfg.validation_steps
            and not sharded
            and state.step % cfg.validation_steps == 0
            and accelerator.is_main_process
        ):
            _log_validation(cfg, accelerator, teacher, student, ema, state.step)
    bar.close()
    if accelerator.is_main_process and (report := loader.bad_sample_report()):
        log.warning(report)
    accelerator.wait_for_everyone()
    final = out / "student"
    export(final)
    accelerator.end_training()
    return final


def _average_across_processes(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce the heads' gradients to their mean (what DDP would do, without wrapping them)."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world_size


def _clip(accelerator: Accelerator, params: list[nn.Parameter], max_norm: float) -> float:
    """Clip a model's own gradients to `max_norm` (0: measure only); returns the norm before clipping."""
    return float(accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


def _check_resume_family(resume: Path | None, family: str) -> None:
    if resume is None:
        return
    info = resume.parent / "run.json"
    if info.is_file():
        saved = json.loads(info.read_text()).get("family")
        if saved and saved != family:
            raise TurbokitError(f"{resume} was trained from a {saved} teacher, but --teacher is {family}")


def _pooled_dim(teacher: LoadedModel) -> int:
    c = teacher.components
    if teacher.family == "sdxl":
        return int(c["text_encoder_2"].config.projection_dim)
    return int(c["text_encoder"].config.hidden_size)


def _prepare_batch(
    raw: distill_data.Batch,
    family,
    m: StepModels,
    family_name: str,
    gen: torch.Generator,
    uncond,
    device: torch.device,
    nfsd: bool,
) -> StepBatch:
    """Latents x₀ (VAE-encoded real images, or cached teacher latents), text conditioning, SDXL extras."""
    cond = family.encode(raw.captions)
    pixels = raw.pixels
    if pixels is not None:
        pixels = pixels.to(device)
        with torch.no_grad():
            dist = m.vae.encode(pixels.to(m.vae.dtype)).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
        x0 = z.float() * m.scaling_factor
    else:
        x0 = raw.latents.to(device).float()
    n = x0.shape[0]
    neg = uncond(n)
    if family_name == "sdxl":
        size = (x0.shape[-2] * 8, x0.shape[-1] * 8)
        ids = _sdxl_time_ids(raw, size, cond.embeds.dtype, device)
        kwargs = {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": ids}}
        neg_kwargs = _with_pooled(kwargs, neg)
    else:
        kwargs, neg_kwargs = {}, {}
    batch = StepBatch(x0=x0, pixels=pixels, cond=cond, uncond=neg, unet_kwargs=kwargs, uncond_unet_kwargs=neg_kwargs)
    if nfsd:
        batch.negative = family.encode([NFSD_NEGATIVE_PROMPT] * n)
        batch.negative_unet_kwargs = _with_pooled(kwargs, batch.negative)
    return batch


def _with_pooled(kwargs: dict, cond: Conditioning) -> dict:
    if "added_cond_kwargs" not in kwargs:
        return kwargs
    return {"added_cond_kwargs": {**kwargs["added_cond_kwargs"], "text_embeds": cond.pooled}}


def _disc_inputs_fn(cfg: DistillConfig, disc: nn.Module, m: StepModels, gen: torch.Generator):
    """What the discriminator sees. add: pixels, conditioned on the pooled text and the real image's DINOv2
    CLS; ladd: latents re-noised to one shared level t̂ per sample, conditioned on t̂ and the pooled text."""
    if cfg.method == "add":
        image_embeds: dict[str, Tensor] = {}

        def add_inputs(latents: Tensor, pixels: Tensor | None, b: StepBatch) -> tuple[Tensor, dict]:
            if "cls" not in image_embeds:
                with torch.no_grad():
                    image_embeds["cls"] = disc.feature_network.cls_embedding(b.pixels)
            heads = {"text_embeds": b.cond.pooled, "image_embeds": image_embeds["cls"]}
            return pixels, {"features": {}, "heads": heads}

        return add_inputs

    noise_state: dict[str, Tensor] = {}

    def ladd_inputs(latents: Tensor, pixels: Tensor | None, b: StepBatch) -> tuple[Tensor, dict]:
        n = latents.shape[0]
        if not noise_state:
            noise_state["t"] = ladd_timesteps(
                n, gen, m.alphas_cumprod.cpu(), cfg.ladd_noise_mean, cfg.ladd_noise_std
            ).to(latents.device)
            noise_state["eps"] = torch.randn(latents.shape, generator=gen).to(latents.device)
        t = noise_state["t"]
        alpha, sigma = sampling.vp_coefficients(m.alphas_cumprod, t)
        x_t = sampling.add_noise_vp(latents, noise_state["eps"], alpha, sigma)
        features = {"timestep": t, "encoder_hidden_states": b.cond.embeds, **b.unet_kwargs}
        return x_t, {"features": features, "heads": {"text_embeds": b.cond.pooled, "noise_level": t}}

    return ladd_inputs


def _synthetic_source(cfg: DistillConfig, teacher: LoadedModel, resolution: int, accelerator: Accelerator):
    from turbokit.distill.synthetic import SyntheticLatentSource, generate_synthetic_latents, read_prompts
    from turbokit.pipeline import TurboPipeline
    from turbokit.precision import choose_precision

    cache = Path(cfg.output_dir) / "synthetic-cache"
    if accelerator.is_main_process:
        prompts = read_prompts(Path(cfg.data))  # already checked by build_source, before the teacher loaded
        if cfg.num_synthetic_samples:
            prompts = [prompts[i % len(prompts)] for i in range(cfg.num_synthetic_samples)]
        pipe = TurboPipeline(copy.deepcopy(teacher), accelerator.device, choose_precision(accelerator.device, "fp32"))
        generate_synthetic_latents(
            pipe,
            prompts,
            cache,
            steps=cfg.synthetic_steps,
            guidance_scale=cfg.synthetic_guidance_scale,
            resolution=resolution,
            seed=cfg.seed,
        )
        del pipe
    accelerator.wait_for_everyone()
    return SyntheticLatentSource(cache)


def _log_validation(
    cfg: DistillConfig,
    accelerator: Accelerator,
    teacher: LoadedModel,
    student: nn.Module,
    ema: EMAModel | None,
    step: int,
) -> None:
    """Images of the validation prompts at 1 and 4 steps from a copy of the current (EMA) student, logged
    to the trackers. The frozen parts are shared, in the precision they already have: nothing is cast."""
    from turbokit.images import tensor_to_pil
    from turbokit.pipeline import TurboPipeline
    from turbokit.precision import Precision

    unet = copy.deepcopy(accelerator.unwrap_model(student))
    if ema is not None:
        ema.copy_to(unet.parameters())
    c = teacher.components
    precision = Precision(compute=c["text_encoder"].dtype, vae=c["vae"].dtype)
    scheduler = type(c["scheduler"]).from_config(c["scheduler"].config, prediction_type=cfg.student_prediction(teacher))
    model = LoadedModel(teacher.family, {**c, "unet": unet, "scheduler": scheduler}, "student", teacher.extra)
    pipe = TurboPipeline(model, accelerator.device, precision)
    prompts = [p for p in cfg.validation_prompts.split("|") if p.strip()]
    for steps in (1, 4):
        pixels = pipe(prompts, steps=steps, seed=0).pixels
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(f"validation/{steps}_steps", pixels.numpy(), step, dataformats="NCHW")
            elif tracker.name == "wandb":
                import wandb

                images = [wandb.Image(img, caption=p) for img, p in zip(tensor_to_pil(pixels), prompts, strict=True)]
                tracker.log({f"validation/{steps}_steps": images}, step=step)
