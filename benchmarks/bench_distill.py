"""One ADD / LADD distillation step: its time and memory, and its time against the sum of its parts (issue #3).

Builds the models in memory with random weights (speed and memory only) — `--size full`: SD-Turbo's
UNet, VAE and OpenCLIP-H text encoder from the shipped configs plus a DINOv2 ViT-S/14 shaped like
facebook/dinov2-small; `--size tiny`: `turbokit.tiny` and a tiny DINOv2 — and sets them up as
`turbokit.distill.trainer.train` does (student fp32 master weights, frozen parts in the compute dtype,
accelerate autocast, AdamW for the student and for the discriminator heads, the trainer's
discriminator, batch preparation and discriminator inputs). It then times, interleaved:

  step     the real `turbokit.distill.step.distill_step` (the batch is prepared beforehand: text
           encoding and the VAE encoding of the real image are outside the step and timed apart);
  parts    each measured alone on the same inputs, with the same calls the step makes:
           (1) student forward + backward — for add including the VAE decode of x̂ (forward and
               backward), since the discriminator and the pixel-space distillation loss need it;
           (2) teacher forward (one; two with classifier-free guidance);
           (3) discriminator forward + backward — the D update (features of x₀ and x̂, heads, R1
               on the heads' inputs, backward) and the G side (heads on the same features of x̂,
               backward through the feature network into its input, i.e. x̂'s pixels or latents);
  extras   work the step does outside those parts, timed alone to explain the remainder:
           optimizer steps with clipping (timed inside the step), the VAE decode of the teacher's
           target (add: pixel-space distillation loss), a VAE decode of x̂ nobody reads (ladd on
           image data), and, inside part (3), add's second DINOv2 pass over x₀ for its CLS embedding.

Prints the medians, the ratio step / (sum of parts) against the target 1.2, how often each network
ran in one step, and memory: the resident size of parameters and optimizer states and the peak
resident-memory growth during a step. A guard ends the process if memory nears the machine's limit.

    python benchmarks/bench_distill.py --size tiny --method both --steps 5
    python benchmarks/bench_distill.py --size full --method add --steps 3     # bf16, checkpointing, 512²
    python benchmarks/bench_distill.py --size full --method ladd --steps 2 --ladd-data latents --distill-lambda 2.5

Full size needs about 19 GiB of RAM and a quiet machine (figures and notes: docs/performance.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from bench_inference import random_sd_turbo
from diffusers.optimization import get_scheduler
from diffusers.schedulers import EulerDiscreteScheduler
from diffusers.utils import logging as diffusers_logging
from peak_rss import PeakRSS, rss_bytes
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model
from transformers.utils import logging as transformers_logging

from turbokit import sampling
from turbokit.distill import data as distill_data
from turbokit.distill import losses
from turbokit.distill.config import DistillConfig
from turbokit.distill.discriminator import DEFAULT_CONDITIONING, build_discriminator
from turbokit.distill.feature_networks import DinoFeatures
from turbokit.distill.step import StepBatch, StepModels, decode, distill_step, frozen, teacher_x0, x0_prediction
from turbokit.distill.trainer import (
    _clip,
    _disc_inputs_fn,
    _family,
    _pooled_dim,
    _prepare_batch,
    _weight_dtype,
)
from turbokit.families import Conditioning
from turbokit.loading import LoadedModel
from turbokit.tiny import tiny_components

GIB = 2**30
PROMPT = "a photograph of an astronaut riding a horse"
PART_NAMES = ("student fwd+bwd", "teacher fwd", "disc fwd+bwd")


# --------------------------------------------------------------------------------------------- memory


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


class MemoryGuard:
    """Ends the process (exit code 3) if its resident memory passes `max_rss_gib` or the machine's available
    memory falls below `min_available_gib`: the machine is shared, and being OOM-killed is worse for everyone."""

    def __init__(self, max_rss_gib: float, min_available_gib: float) -> None:
        self.max_rss, self.min_available = max_rss_gib * GIB, min_available_gib * GIB
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            rss, available = rss_bytes(), mem_available_bytes()
            if rss > self.max_rss or available < self.min_available:
                print(
                    f"\nMEMORY GUARD: resident {rss / GIB:.1f} GiB, machine available {available / GIB:.1f} GiB "
                    f"(limits {self.max_rss / GIB:.1f} / {self.min_available / GIB:.1f}); stopping.",
                    flush=True,
                )
                os._exit(3)
            time.sleep(0.02)


def tensor_gib(tensors: list[Tensor]) -> float:
    """Bytes of distinct tensors (shared parameters, e.g. LADD's teacher in the discriminator, count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "cpu" and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / GIB


# --------------------------------------------------------------------------------------------- models


def random_dino(size: str) -> DinoFeatures:
    """A random DINOv2 feature network: ViT-S/14 as facebook/dinov2-small for full size, a tiny ViT otherwise.
    image_size 224 as `DinoFeatures.from_pretrained`, which the trainer uses."""
    torch.manual_seed(0)
    if size == "full":
        config = Dinov2Config(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518
        )
    else:
        config = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, patch_size=14, image_size=56)
    return DinoFeatures(Dinov2Model(config))


@dataclass
class Run:
    """One method's training set-up, as `train()` builds it."""

    cfg: DistillConfig
    accelerator: Accelerator
    models: StepModels
    family: object
    disc: nn.Module
    student_params: list[nn.Parameter]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    d_update: Callable[[Tensor], None]
    g_update: Callable[[Tensor], None]
    update_times: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    uncond_cache: dict[int, Conditioning] = field(default_factory=dict)

    def uncond(self, n: int) -> Conditioning:  # the trainer's `uncond`
        if n not in self.uncond_cache:
            empty = self.family.encode([""] * n)
            self.uncond_cache[n] = empty.zeros_like() if self.family.zero_negative else empty
        return self.uncond_cache[n]


def setup(
    method: str, args: argparse.Namespace, teacher: LoadedModel, dino: DinoFeatures | None, acc: Accelerator
) -> Run:
    """What `train()` does between loading the teacher and the loop (without data, trackers and checkpoints).

    Kept in step with trainer.py by hand: `train()` builds its models inline (see the report of issue #3)."""
    cfg = DistillConfig(
        method=method,
        mixed_precision="bf16" if args.dtype == "bf16" else "no",
        gradient_checkpointing=args.gradient_checkpointing,
        train_batch_size=args.batch,
        resolution=args.resolution,
        teacher_guidance_scale=args.teacher_guidance,
        disc_conditioning=DEFAULT_CONDITIONING[method],  # what cfg.validate() leaves for the method
        synthetic=method == "ladd" and args.ladd_data == "latents",  # by default λ = 0: LADD drops L_distill
        distill_lambda=args.distill_lambda,
        report_to="none",
        progress=False,
    )
    device, weight_dtype = acc.device, _weight_dtype(cfg.mixed_precision)
    c = teacher.components
    unet_t, vae = c["unet"], c["vae"]
    student = copy.deepcopy(unet_t).float().train().requires_grad_(True)  # a later method copies a frozen teacher
    for module in [unet_t, vae, c["text_encoder"], c.get("text_encoder_2")]:
        if module is not None:
            module.requires_grad_(False).eval().to(device, weight_dtype)
    if weight_dtype == torch.float16 and vae.config.get("force_upcast", True):
        vae.to(torch.float32)
    family = _family(teacher)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student_params = [p for p in student.parameters() if p.requires_grad]

    set_seed(cfg.seed)
    disc = build_discriminator(
        method, dino=dino, teacher_unet=unet_t, text_dim=_pooled_dim(teacher), conditioning=cfg.disc_conditioning
    ).to(device)
    betas_g, betas_d = (cfg.adam_beta1, cfg.adam_beta2), (cfg.disc_adam_beta1, cfg.disc_adam_beta2)
    opt_g = torch.optim.AdamW(student_params, lr=cfg.learning_rate, betas=betas_g, weight_decay=cfg.adam_weight_decay)
    opt_d = torch.optim.AdamW(
        disc.trainable_parameters(), lr=cfg.disc_learning_rate, betas=betas_d, weight_decay=cfg.adam_weight_decay
    )
    n_sched, warm = cfg.max_train_steps, cfg.lr_warmup_steps
    sched_g = get_scheduler(cfg.lr_scheduler, opt_g, num_warmup_steps=warm, num_training_steps=n_sched)
    sched_d = get_scheduler(cfg.lr_scheduler, opt_d, num_warmup_steps=warm, num_training_steps=n_sched)
    student, opt_g, sched_g = acc.prepare(student, opt_g, sched_g)  # only the student goes through accelerate

    scheduler = EulerDiscreteScheduler.from_config(c["scheduler"].config)
    models = StepModels(
        student=student,
        teacher=unet_t,
        vae=vae,
        disc=disc,
        alphas_cumprod=scheduler.alphas_cumprod.to(device),
        prediction_type=c["scheduler"].config.get("prediction_type", "epsilon"),
        scaling_factor=vae.config.scaling_factor,
        student_prediction_type=cfg.student_prediction(teacher),
    )
    times: dict[str, float] = defaultdict(float)
    head_params = disc.trainable_parameters()

    def d_update(loss: Tensor) -> None:
        """The trainer's d_update (one process: no averaging), with backward and optimizer timed apart."""
        start = time.perf_counter()
        (loss / cfg.gradient_accumulation_steps).backward()
        mid = time.perf_counter()
        if acc.sync_gradients:
            torch.nn.utils.clip_grad_norm_(head_params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            opt_d.step()
            sched_d.step()
            opt_d.zero_grad(set_to_none=True)
        times["D backward"] += mid - start
        times["D clip+AdamW"] += time.perf_counter() - mid

    def g_update(loss: Tensor) -> None:
        """The trainer's g_update, with backward and optimizer timed apart."""
        start = time.perf_counter()
        acc.backward(loss)
        mid = time.perf_counter()
        if acc.sync_gradients:
            _clip(acc, list(student.parameters()), cfg.max_grad_norm)
        opt_g.step()
        sched_g.step()
        opt_g.zero_grad(set_to_none=True)
        times["G backward"] += mid - start
        times["G clip+AdamW"] += time.perf_counter() - mid

    return Run(
        cfg=cfg,
        accelerator=acc,
        models=models,
        family=family,
        disc=disc,
        student_params=student_params,
        opt_g=opt_g,
        opt_d=opt_d,
        d_update=d_update,
        g_update=g_update,
        update_times=times,
    )


def prepare_batch(r: Run, args: argparse.Namespace, data: str) -> StepBatch:
    """A batch as the trainer's loop makes it: random 'real' images (image data) or latents (--synthetic)."""
    gen = torch.Generator().manual_seed(123)
    n, res = args.batch, args.resolution
    pixels = latents = None
    if data == "pixels":
        pixels = torch.rand(n, 3, res, res, generator=gen) * 2 - 1
    else:
        latents = torch.randn(n, 4, res // 8, res // 8, generator=gen)
    raw = distill_data.Batch(
        captions=[PROMPT] * n,
        pixels=pixels,
        latents=latents,
        original_sizes=torch.zeros(n, 2, dtype=torch.int64),
        crop_top_lefts=torch.zeros(n, 2, dtype=torch.int64),
    )
    with r.accelerator.autocast():
        return _prepare_batch(
            raw, r.family, r.models, "sd2", gen, r.uncond, r.accelerator.device, r.cfg.distill_weighting == "nfsd"
        )


# ----------------------------------------------------------------------------------------- the step


def run_step(r: Run, b: StepBatch, gen: torch.Generator) -> dict[str, float]:
    """The trainer's loop body for one (micro-)batch, minus `_prepare_batch`."""
    with r.accelerator.accumulate(r.models.student), r.accelerator.autocast():
        disc_inputs = _disc_inputs_fn(r.cfg, r.disc, r.models, gen)
        return distill_step(b, r.models, r.cfg, gen, disc_inputs, r.d_update, r.g_update)


def count_calls(r: Run, teacher: LoadedModel, dino: DinoFeatures | None) -> tuple[dict[str, int], Callable[[], None]]:
    """Forward calls per network (pre-hooks, so the teacher-feature passes stopped after the mid block count too)."""
    counts: dict[str, int] = defaultdict(int)
    c = teacher.components
    watched = {
        "student UNet": r.models.student,
        "teacher UNet (all calls)": c["unet"],
        "  of which discriminator features (down+mid only)": r.disc.feature_network if r.cfg.method == "ladd" else None,
        "VAE decoder": c["vae"].decoder,
        "VAE encoder": c["vae"].encoder,
        "DINOv2": dino.model if (dino is not None and r.cfg.method == "add") else None,
        "text encoder": c["text_encoder"],
    }
    handles = []
    for name, module in watched.items():
        if module is not None:
            counts[name] = 0
            handles.append(
                module.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
            )
    return counts, lambda: [h.remove() for h in handles]


# ----------------------------------------------------------------------------------------- the parts


@dataclass
class PartInputs:
    """Fixed inputs for the isolated parts, made as the step makes them (no gradient)."""

    x_s: Tensor
    s: Tensor
    x_hat: Tensor
    fake_pixels: Tensor | None
    x_hat_t: Tensor
    t: Tensor
    guidance: Tensor
    target: Tensor


def part_inputs(r: Run, b: StepBatch) -> PartInputs:
    m, cfg, n = r.models, r.cfg, b.x0.shape[0]
    gen = torch.Generator().manual_seed(7)
    s = torch.full((n,), cfg.student_timestep_list[0])
    alpha_s, sigma_s = sampling.vp_coefficients(m.alphas_cumprod, s)
    x_s = sampling.add_noise_vp(b.x0, torch.randn(b.x0.shape, generator=gen), alpha_s, sigma_s)
    t = torch.full((n,), sum(cfg.teacher_t_range) // 2)
    g_lo, g_hi = cfg.guidance_range
    guidance = torch.full((n,), (g_lo + g_hi) / 2)
    with torch.no_grad(), r.accelerator.autocast():
        x_hat = x0_prediction(m.student, x_s, s, b.cond, b.unet_kwargs, m)
        fake_pixels = decode(m.vae, x_hat, m.scaling_factor) if cfg.method == "add" else None
        alpha_t, sigma_t = sampling.vp_coefficients(m.alphas_cumprod, t)
        x_hat_t = sampling.add_noise_vp(x_hat, torch.randn(x_hat.shape, generator=gen), alpha_t, sigma_t)
        target = teacher_x0(x_hat_t, t, b, m, guidance)
    return PartInputs(x_s, s, x_hat, fake_pixels, x_hat_t, t, guidance, target)


def fmt(seconds: float) -> str:
    return f"{seconds:.3g}" if abs(seconds) < 10 else f"{seconds:.1f}"


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock seconds and this process's CPU seconds (all threads): the machine is shared, and CPU time
    is much less affected when another process takes a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def profile_ops(fns: list[Callable[[], object]]) -> dict[str, tuple[float, int]]:
    """Self CPU seconds and calls per operator over `fns` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for fn in fns:
            fn()
    return {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}


def part_student(r: Run, b: StepBatch, p: PartInputs) -> None:
    """(1) x̂ = student's x̂₀ of x_s (add: decoded to pixels), backward of a scalar of it into the student."""
    m = r.models
    with r.accelerator.autocast():
        x_hat = x0_prediction(m.student, p.x_s, p.s, b.cond, b.unet_kwargs, m)
        out = decode(m.vae, x_hat, m.scaling_factor) if r.cfg.method == "add" else x_hat
        r.accelerator.backward(out.square().mean())
    r.opt_g.zero_grad(set_to_none=True)


def part_teacher(r: Run, b: StepBatch, p: PartInputs) -> None:
    """(2) the teacher's x̂₀ of the re-noised x̂ (two UNet calls when guidance > 1; none when λ = 0, as the step)."""
    if r.cfg.distill_lambda_value <= 0:
        return
    with r.accelerator.autocast():
        teacher_x0(p.x_hat_t, p.t, b, r.models, p.guidance)


def part_disc(r: Run, b: StepBatch, p: PartInputs) -> None:
    """(3) the discriminator lines of `distill_step`: features of x₀ and, once, of x̂ (graph kept); the D update
    (heads on real and detached fake features, R1, backward; not the optimizer step); the G side (heads on the
    same fake features, backward through the feature network into a leaf at its input: x̂'s pixels for add,
    x̂ for ladd, so the backward stops where part (1) takes over)."""
    m, cfg, acc = r.models, r.cfg, r.accelerator
    gen = torch.Generator().manual_seed(11)
    if p.fake_pixels is None:
        latents, pixels = p.x_hat.detach().requires_grad_(True), None
    else:
        latents, pixels = p.x_hat, p.fake_pixels.detach().requires_grad_(True)
    with acc.autocast():
        disc_inputs = _disc_inputs_fn(cfg, r.disc, m, gen)
        real_in, real_cond = disc_inputs(b.x0, b.pixels, b)
        fake_in, fake_cond = disc_inputs(latents, pixels, b)
        fake_features = m.disc.features(fake_in, **fake_cond["features"])
        real_features = [f.detach().requires_grad_(True) for f in m.disc.features(real_in, **real_cond["features"])]
        real_logits = m.disc.head_logits(real_features, **real_cond["heads"])
        fake_logits = m.disc.head_logits([f.detach() for f in fake_features], **fake_cond["heads"])
        loss_d = losses.hinge_discriminator_loss(real_logits, fake_logits)
        r1 = losses.r1_penalty(real_logits, real_features) if cfg.r1_gamma > 0 else 0
        (loss_d + cfg.r1_gamma * r1).backward()  # as the trainer's d_update
        r.opt_d.zero_grad(set_to_none=True)
        with frozen(m.disc):
            loss_adv = losses.hinge_generator_loss(m.disc.head_logits(fake_features, **fake_cond["heads"]))
        acc.backward(loss_adv)


def extras(r: Run, b: StepBatch, p: PartInputs) -> dict[str, Callable[[], object]]:
    """Work the step does that none of the three parts holds (or that part 3 does twice), to time alone."""
    m, cfg, acc = r.models, r.cfg, r.accelerator
    out: dict[str, Callable[[], object]] = {}

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), acc.autocast():
                return fn()

        return run

    if cfg.distill_in_pixels and cfg.distill_lambda_value > 0:
        out["VAE decode of the teacher target (pixel-space L_distill, no grad)"] = no_grad(
            lambda: decode(m.vae, p.target, m.scaling_factor)
        )
    if cfg.method == "ladd" and not cfg.distill_in_pixels:

        def unused_decode() -> None:
            with acc.autocast():
                decode(m.vae, p.x_hat.detach().requires_grad_(True), m.scaling_factor)  # with graph, as in the step

        if b.pixels is not None:
            out["VAE decode of x̂ with graph, never read (ladd on image data)"] = unused_decode
        else:  # what the same step costs more on image data, where it decodes x̂ for nothing
            out["not in this step: VAE decode of x̂ with graph, which ladd on image data adds unread"] = unused_decode
    if cfg.method == "add":
        out["in part 3: CLS embedding of x₀, a second DINOv2 pass over the real image"] = no_grad(
            lambda: r.disc.feature_network.cls_embedding(b.pixels)
        )
    return out


# ----------------------------------------------------------------------------------------- driver


def measure(method: str, args: argparse.Namespace, teacher: LoadedModel, dino: DinoFeatures | None, acc) -> dict:
    r = setup(method, args, teacher, dino, acc)
    label = "add"
    if method == "ladd":
        data = "image data" if args.ladd_data == "pixels" else "latents"
        label = f"ladd ({data}, λ = {r.cfg.distill_lambda_value:g})"
    print(f"\n== {label}", flush=True)
    start = time.perf_counter()
    b = prepare_batch(r, args, "pixels" if method == "add" else args.ladd_data)
    t_prepare = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)

    counts, unhook = count_calls(r, teacher, dino)
    for i in range(args.warmup):
        w, _ = timed(lambda: run_step(r, b, gen))
        print(f"  warm-up step {i + 1}: {w:.2f} s", flush=True)
        if i == 0:
            unhook()
            calls = dict(counts)
    r.update_times.clear()

    static_params = tensor_gib(
        [
            t
            for module in (r.models.student, r.models.teacher, r.models.vae, teacher.components["text_encoder"], r.disc)
            for t in [*module.parameters(), *module.buffers()]
        ]
    )
    opt_states = tensor_gib(
        [
            v
            for opt in (r.opt_g, r.opt_d)
            for state in opt.state.values()
            for v in state.values()
            if isinstance(v, Tensor)
        ]
    )
    p = part_inputs(r, b)
    parts = {
        PART_NAMES[0]: lambda: part_student(r, b, p),
        PART_NAMES[1]: lambda: part_teacher(r, b, p),
        PART_NAMES[2]: lambda: part_disc(r, b, p),
    }
    extra = extras(r, b, p)
    for fn in [*parts.values(), *extra.values()]:  # warm-up of the isolated calls
        fn()
    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    loads: list[float] = []
    growth, rss_before, rss_peak = [], [], []
    item_growth: dict[str, float] = {}
    for rep in range(args.steps):
        r.update_times.clear()
        rss_before.append(rss_bytes() / GIB)
        with PeakRSS() as mem:
            wall, cpu_s = timed(lambda: run_step(r, b, gen))
        times["step"].append(wall)
        cpu["step"].append(cpu_s)
        growth.append(mem.growth_gib)
        rss_peak.append(mem.peak / GIB)
        for name, value in r.update_times.items():
            times[f"in step: {name}"].append(value)
        for name, fn in {**parts, **extra}.items():
            with PeakRSS() as mem:
                wall, cpu_s = timed(fn)
            times[name].append(wall)
            cpu[name].append(cpu_s)
            item_growth[name] = max(item_growth.get(name, 0.0), mem.growth_gib)
        loads.append(os.getloadavg()[0])
        print(
            f"  rep {rep + 1} (load {loads[-1]:.2f}): step {times['step'][-1]:.2f} s; parts "
            + ", ".join(f"{n} {times[n][-1]:.2f}" for n in PART_NAMES),
            flush=True,
        )
    med = {name: statistics.median(v) for name, v in times.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    low = {name: min(v) for name, v in times.items()}  # contention only ever adds time
    ops = None
    if args.profile:
        print("  profiling one step and one round of the parts ...", flush=True)
        ops = (profile_ops([lambda: run_step(r, b, gen)]), profile_ops(list(parts.values())))
    result = {
        "label": label,
        "cfg": r.cfg,
        "med": med,
        "med_cpu": med_cpu,
        "min": low,
        "loads": loads,
        "ops": ops,
        "extra_names": list(extra),
        "calls": calls,
        "prepare": t_prepare,
        "params_gib": static_params,
        "opt_gib": opt_states,
        "rss_before": max(rss_before),
        "growth": max(growth),
        "rss_peak": max(rss_peak),
        "item_growth": item_growth,
    }
    report([result], args)
    return result


def report(results: list[dict], args: argparse.Namespace) -> None:
    n = args.steps
    print(
        f"\n{args.size} models, {args.dtype}, {args.resolution}², batch {args.batch}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, {torch.get_num_threads()} threads, median of {n}:"
    )
    print(
        "| method | step s | student fwd+bwd s | teacher fwd s | disc fwd+bwd s | sum of parts s "
        "| step / parts (target ≤ 1.2) | same, minima | same, CPU time | load average |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        med, med_cpu = res["med"], res["med_cpu"]
        parts = sum(med[name] for name in PART_NAMES)
        cells = " | ".join(f"{fmt(med[name])}" for name in PART_NAMES)
        ratio = med["step"] / parts
        ratio_cpu = med_cpu["step"] / sum(med_cpu[name] for name in PART_NAMES)
        ratio_min = res["min"]["step"] / sum(res["min"][name] for name in PART_NAMES)
        load = "–".join(f"{x:.1f}" for x in (min(res["loads"]), max(res["loads"])))
        print(
            f"| {res['label']} | {fmt(med['step'])} | {cells} | {fmt(parts)} | **{ratio:.2f}** | {ratio_min:.2f} "
            f"| {ratio_cpu:.2f} | {load} |"
        )
    print(
        "\n| method | params GiB | AdamW states GiB | RSS before a step GiB | peak RSS growth per step GiB "
        "| peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|")
    for res in results:
        print(
            f"| {res['label']} | {res['params_gib']:.2f} | {res['opt_gib']:.2f} | {res['rss_before']:.2f} | "
            f"{res['growth']:.2f} | {res['rss_peak']:.2f} |"
        )
    for res in results:
        med, low, cfg, grow = res["med"], res["min"], res["cfg"], res["item_growth"]
        parts = sum(med[name] for name in PART_NAMES)
        print(f"\n{res['label']}: where the step's time goes")
        print("| item | median s | min s | peak RSS growth GiB | in the sum of parts? |")
        print("|---|---|---|---|---|")

        def row(text: str, key: str, where: str, med: dict = med, low: dict = low, grow: dict = grow) -> None:
            mem = f"{grow[key]:.2f}" if key in grow else "—"
            print(f"| {text} | {fmt(med[key])} | {fmt(low[key])} | {mem} | {where} |")

        student_note = " (incl. VAE decode of x̂, fwd+bwd)" if cfg.method == "add" else ""
        row(f"(1) student fwd+bwd{student_note}", PART_NAMES[0], "yes")
        if cfg.distill_lambda_value <= 0:
            calls = "none: λ = 0"
        else:
            calls = "2 calls, CFG" if cfg.guidance_range[1] > 1 else "1 call"
        row(f"(2) teacher fwd ({calls})", PART_NAMES[1], "yes")
        row("(3) discriminator fwd+bwd (D update + G side)", PART_NAMES[2], "yes")
        outside = 0.0
        for name in sorted(k for k in med if k.startswith("in step:") and "clip+AdamW" in k):
            row(f"{name} (timed inside the step)", name, "no")
            outside += med[name]
        for name in sorted(k for k in med if k.startswith("in step:") and "backward" in k):
            row(f"{name} (timed inside the step, for reference)", name, "(spread over the parts)")
        for name in res["extra_names"]:
            where = "yes — done twice" if name.startswith("in part 3") else "—" if name.startswith("not in") else "no"
            row(name, name, where)
            outside += med[name] if where == "no" else 0
        print(f"| rest: step − parts − the 'no' rows (medians) | {fmt(med['step'] - parts - outside)} | | — | — |")
        encode = " + VAE encode of the image" if cfg.method == "add" or args.ladd_data == "pixels" else ""
        print(f"| not in the step: batch preparation (text encoder{encode}) | {fmt(res['prepare'])} | | — | — |")
        print("\nforward calls per step: " + ", ".join(f"{k.strip()} {v}" for k, v in res["calls"].items()))
        print(f"step / (parts + the 'no' rows) = {med['step'] / (parts + outside):.2f}")
        if res["ops"] is not None:
            step_ops, part_ops = res["ops"]
            keys = set(step_ops) | set(part_ops)
            diff = sorted(keys, key=lambda k: step_ops.get(k, (0, 0))[0] - part_ops.get(k, (0, 0))[0], reverse=True)
            total_step, total_parts = (sum(t for t, _ in o.values()) for o in (step_ops, part_ops))
            print(
                f"\n{res['label']}: profile (self CPU time, one step vs one round of the parts: "
                f"{fmt(total_step)} s vs {fmt(total_parts)} s), operators the step spends more time in"
            )
            print("| operator | step s | parts s | step − parts s | step calls | parts calls |")
            print("|---|---|---|---|---|---|")
            for k in diff[:20]:
                (a, na), (b, nb) = step_ops.get(k, (0.0, 0)), part_ops.get(k, (0.0, 0))
                print(f"| {k} | {fmt(a)} | {fmt(b)} | {fmt(a - b)} | {na} | {nb} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--method", choices=("add", "ladd", "both"), default="both")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (and repetitions of each part)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 full, 2 tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 512 full, 64 tiny)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 full, fp32 tiny")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--teacher-guidance", default="1.0", help="the trainer's --teacher_guidance_scale")
    parser.add_argument("--ladd-data", choices=("pixels", "latents"), default="pixels", help="images or --synthetic")
    parser.add_argument("--distill-lambda", type=float, default=-1.0, help="the trainer's --distill_lambda")
    parser.add_argument("--profile", action="store_true", help="torch.profiler: step vs parts, per operator")
    parser.add_argument("--max-rss-gb", type=float, default=21.5, help="memory guard: stop above this RSS (GiB)")
    parser.add_argument("--min-available-gb", type=float, default=0.8, help="memory guard: machine's MemAvailable")
    args = parser.parse_args()
    full = args.size == "full"
    args.warmup = max(1, args.warmup) if args.warmup is not None else (1 if full else 2)
    args.resolution = args.resolution or (512 if full else 64)
    args.dtype = args.dtype or ("bf16" if full else "fp32")
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = full
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    MemoryGuard(args.max_rss_gb, args.min_available_gb)

    acc = Accelerator(mixed_precision="bf16" if args.dtype == "bf16" else "no", cpu=True)
    print(f"building random-weight {args.size} models ({torch.get_num_threads()} threads) ...", flush=True)
    start = time.perf_counter()
    components = random_sd_turbo() if full else tiny_components("sd2")
    teacher = LoadedModel("sd2", components, f"{args.size}-random")
    methods = ["ladd", "add"] if args.method == "both" else [args.method]  # the lighter one first
    dino = random_dino(args.size) if "add" in methods else None
    print(f"built in {time.perf_counter() - start:.1f} s; RSS {rss_bytes() / GIB:.2f} GiB", flush=True)
    results = {}
    for method in methods:
        results[method] = measure(method, args, teacher, dino, acc)
        acc.free_memory()  # the accelerator holds the method's student and optimizers
        gc.collect()
    if len(results) > 1:
        print("\n==== all methods")
        report([results[m] for m in ("add", "ladd") if m in results], args)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nprocess peak RSS (incl. building the models): {max_rss:.2f} GiB")


if __name__ == "__main__":
    main()
