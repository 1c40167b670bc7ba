"""`turbokit recipe shapes`: turbokit's own Turbo model, built end to end on a CPU (issue 4).

Stages, each resumable (re-run the same command after an interruption; a finished stage is skipped):

  vae      a small AutoencoderKL                         → ROOT/vae/vae
  text     a small CLIP (text encoder + ViT for ADD)     → ROOT/text/{text_encoder,tokenizer,dino}
  teacher  the many-step SD 2.x-style teacher UNet      → ROOT/teacher/model
  distill  the student, with `turbokit distill` (ADD)   → ROOT/student/<run>/student
  eval     the study's table rows (`turbokit eval`)     → ROOT/eval/*.json

`--scale` multiplies every stage's step count (the tests run the whole recipe at a tiny scale).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from turbokit.compat import save_pretrained
from turbokit.errors import TurbokitError
from turbokit.precision import default_device, training_mixed_precision
from turbokit.recipes.training import finished

STAGES = ("vae", "text", "teacher", "distill", "eval")
DEFAULT_ROOT = "build/recipe-shapes"
TEACHER_GUIDANCE = 3.0  # the teacher's CFG scale, in its own sampling and as the distillation target


@dataclass
class Budget:
    """Steps and batch sizes of each stage at scale 1 (about 2–3 hours on a 2-core CPU in all)."""

    vae_steps: int = 1500
    vae_batch: int = 32
    text_steps: int = 1500
    text_batch: int = 128
    teacher_steps: int = 3500
    teacher_batch: int = 64
    distill_steps: int = 1000
    distill_batch: int = 32
    ablation_steps: int = 500
    eval_images: int = 2000
    evaluator_steps: int = 2500
    evaluator_samples: int = 20000

    @property
    def baseline_step(self) -> int | None:
        """The main run's step exported as the ablation that shares its options; None when main is that long."""
        return self.ablation_steps if self.ablation_steps < self.distill_steps else None

    def scaled(self, scale: float) -> Budget:
        steps = {k: max(2, round(v * scale)) for k, v in vars(self).items() if k.endswith("_steps")}
        return Budget(**{**vars(self), **steps})


def stage_vae(root: Path, budget: Budget, seed: int, progress: bool) -> None:
    from turbokit.recipes.autoencoder import train_vae

    train_vae(root / "vae", budget.vae_steps, budget.vae_batch, seed=seed, progress=progress)


def stage_text(root: Path, budget: Budget, seed: int, progress: bool) -> None:
    from turbokit.recipes.clip import train_clip

    if finished(root / "text"):  # a kept root (`--stage keep`) has the ViT and tokenizer only
        return

    train_clip(root / "text", budget.text_steps, budget.text_batch, seed=seed, progress=progress)


def _require(path: Path, stage: str) -> Path:
    if not finished(path):
        raise TurbokitError(f"stage {stage!r} has not finished in {path.parent}: run --stage {stage} first")
    return path


def stage_teacher(root: Path, budget: Budget, seed: int, progress: bool) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from turbokit.recipes.teacher import train_teacher

    if finished(root / "teacher"):  # also in a kept root, which has no text stage encoder to load
        return
    vae = AutoencoderKL.from_pretrained(_require(root / "vae", "vae") / "vae")
    text = _require(root / "text", "text")
    train_teacher(
        root / "teacher",
        vae,
        CLIPTextModel.from_pretrained(text / "text_encoder"),
        CLIPTokenizer.from_pretrained(text / "tokenizer"),
        budget.teacher_steps,
        budget.teacher_batch,
        seed=seed,
        progress=progress,
    )


# The student (`main`) and the ablations of issue 4 §4, each a set of `turbokit distill` options over the
# study's base configuration (below); every ablation gets the same step budget, and "both" is the base itself.
# The shipped student is NFSD-weighted with a one-step target: at 1000 steps its 1-step FID was 422 against
# 591 for the base (docs/results.md, fifth session). A run with main's options is main exported at the
# ablation budget (--export_steps; with a constant learning rate it equals a run that long), not run again.
MAIN_RUN: dict[str, object] = {"distill_weighting": "nfsd", "teacher_steps": 1}  # nfsd distils the score at t
DISTILL_RUNS: dict[str, dict[str, object]] = {
    "main": MAIN_RUN,
    "both": {},
    "adv-only": {"distill_lambda": 0.0},
    "distill-only": {"adversarial_weight": 0.0},
    "weighting-sds": {"distill_weighting": "sds"},
    "weighting-nfsd": MAIN_RUN,
    "ladd": {"method": "ladd"},
    "cond-none": {"disc_conditioning": "none"},
    "cond-text": {"disc_conditioning": "text"},
}


def run_source(name: str, budget: Budget) -> tuple[str, str]:
    """The run folder and the export in it that hold run `name`'s student."""
    if name != "main" and DISTILL_RUNS[name] == DISTILL_RUNS["main"]:
        return "main", f"student-step-{budget.baseline_step}" if budget.baseline_step else "student"
    return name, "student"


def distill_config(root: Path, name: str, budget: Budget, seed: int, progress: bool):
    """The `turbokit distill` configuration of run `name`; the command line it equals is in docs/results.md."""
    from turbokit.distill.config import DistillConfig

    # the study's base ("both"); main and the ablations override it (DISTILL_RUNS)
    options: dict[str, object] = dict(
        teacher=str(_require(root / "teacher", "teacher") / "model"),
        data=f"shapes:train?n=1000000&size=64&seed={seed + 3}",
        output_dir=str(root / "student" / name),
        method="add",
        # The teacher's one-step x̂₀ is speckled (its ε errors × σ/α at high t), so the target is its DDIM
        # sample from t in 8 steps: in 4 from pure noise teacher v5 paints "a red circle" red 4 times in 16
        # (orange, brown), in 8 14 times, and its students took the 4-step colours (docs/results.md,
        # 2026-12-02). With turbokit's per-pixel-mean distance, λ = 2.5 left L_distill ~1–5% of the
        # generator's loss. 150-step probes (docs/results.md): FID 9250 at λ 2.5, 3028 at λ 50.
        distill_weighting="exponential",
        teacher_steps=8,
        distill_lambda=50.0,
        # An ε-student's one-step image is its ε error × σ/α ≈ 15 at t = 999: every ε student so far stayed
        # speckled. A v-student gives x̂₀ ≈ −v there; after 500 steps on teacher v5 its 1-step FID was 965
        # against 2999 for the ε main run's step 500 on teacher v4 (docs/results.md, 2026-12-02).
        student_prediction_type="v_prediction",
        dino_model=str(_require(root / "text", "text") / "dino"),
        dino_resolution=64,
        train_batch_size=budget.distill_batch,
        max_train_steps=budget.distill_steps if name == "main" else budget.ablation_steps,
        learning_rate=1e-4,
        disc_learning_rate=2e-4,
        lr_warmup_steps=20,
        teacher_guidance_scale=str(TEACHER_GUIDANCE),
        use_ema=True,
        ema_decay=0.99,
        mixed_precision=training_mixed_precision(default_device()),  # fp32 where bf16 would be emulated
        checkpointing_steps=50,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        report_to="tensorboard",
        logging_steps=10,
        seed=seed,
        progress=progress,
    )
    if name == "main" and budget.baseline_step:
        options["export_steps"] = str(budget.baseline_step)
    options.update(DISTILL_RUNS[name])
    return DistillConfig(**options)


def stage_distill(root: Path, budget: Budget, seed: int, progress: bool, runs: list[str] | None = None) -> None:
    from turbokit.distill.trainer import train

    for name in dict.fromkeys(run_source(name, budget)[0] for name in runs or DISTILL_RUNS):
        out = root / "student" / name
        if (out / "student" / "model_index.json").is_file():
            continue
        print(f"-- distill run {name}", file=sys.stderr, flush=True)
        train(distill_config(root, name, budget, seed, progress))


def stage_eval(root: Path, budget: Budget, seed: int, progress: bool) -> None:
    from turbokit.pipeline import TurboPipeline
    from turbokit.recipes import evaluator as evaluation
    from turbokit.recipes import study

    folder = root / "evaluator"
    if not (folder / "model.safetensors").is_file():
        evaluation.train_evaluator(
            budget.evaluator_samples,
            budget.evaluator_steps,
            min(64, budget.evaluator_samples),
            seed=seed,
            progress=progress,
        ).save(folder)
    scorer = evaluation.ShapesEvaluator.load(folder)
    results = root / "eval" / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if results.is_file():
        done = {(r["name"], r["steps"]) for r in map(json.loads, results.read_text().splitlines()) if r}
    # cheapest and most wanted first (an interrupted stage resumes at the first missing row); the
    # teacher's 25 and 50 steps cost as much as all the rest together
    rows = [("student", root / "student" / "main" / "student", s, 0.0) for s in (1, 2, 4)]
    rows += [("teacher", root / "teacher" / "model", s, TEACHER_GUIDANCE) for s in (1, 2, 4)]
    rows += [
        (f"ablation {name}", root / "student" / Path(*run_source(name, budget)), 1, 0.0)
        for name in DISTILL_RUNS
        if name != "main"
    ]
    rows += [("teacher", root / "teacher" / "model", s, TEACHER_GUIDANCE) for s in (25, 50)]
    for name, model, steps, guidance in rows:
        if (name, steps) in done or not (model / "model_index.json").is_file():
            continue
        pipe = TurboPipeline.from_pretrained(model)
        figures = study.evaluate_model(
            pipe, scorer, steps, guidance, budget.eval_images, budget.eval_images // 4, seed=seed
        )
        row = study.labelled_row(name, model, pipe, figures)
        print(json.dumps(row), file=sys.stderr, flush=True)
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


SHIP_LIMIT_MB = 30.0
MODEL_CARD = """# shapes-turbo

A 1-step Turbo model of the `shapes` world (one or two coloured shapes on a plain background, 64×64),
made by `turbokit recipe shapes --root {root}`: a UNet2DConditionModel teacher trained from scratch on
synthetic captioned scenes, distilled with Adversarial Diffusion Distillation (`turbokit distill`).
The student predicts {prediction} (its scheduler config's `prediction_type`), the teacher epsilon.
Diffusers format, fp16. Runs with `turbokit generate "a red circle on a blue background"` or with
diffusers' `StableDiffusionPipeline` (`num_inference_steps=1, guidance_scale=0`). How good it is, and
how it was measured: turbokit's docs/results.md.
"""


def stage_ship(root: Path, budget: Budget, seed: int, progress: bool) -> Path:
    """The main student as the package ships it: a diffusers folder in fp16 safetensors at ROOT/shapes-turbo,
    with the evaluator beside it (for `turbokit eval`). Copy it to src/turbokit/models/ to make it the default."""
    import shutil

    from diffusers import StableDiffusionPipeline

    student = root / "student" / "main" / "student"
    if not (student / "model_index.json").is_file():
        raise TurbokitError(f"no student in {student}: run --stage distill first")
    if not (root / "evaluator" / "model.safetensors").is_file():
        raise TurbokitError(f"no evaluator in {root / 'evaluator'}: run --stage eval first")
    out = root / "shapes-turbo"
    shutil.rmtree(out, ignore_errors=True)
    pipe = StableDiffusionPipeline.from_pretrained(student, torch_dtype=torch.float16)
    save_pretrained(pipe, out, safe_serialization=True)
    (out / "README.md").write_text(
        MODEL_CARD.format(root=root, prediction=pipe.scheduler.config.prediction_type), encoding="utf-8"
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    if size > SHIP_LIMIT_MB:
        raise TurbokitError(f"the shipped model is {size:.1f} MB, over the {SHIP_LIMIT_MB:.0f} MB budget")
    judge = root / "shapes-evaluator"
    shutil.rmtree(judge, ignore_errors=True)
    shutil.copytree(root / "evaluator", judge)
    print(
        f"wrote {out} ({size:.1f} MB) and {judge}; to make them the package's default:\n"
        f"  cp -r {out} {judge} src/turbokit/models/",
        file=sys.stderr,
    )
    return out


KEPT = {"vae": ("vae",), "text": ("dino", "tokenizer"), "teacher": ("model",)}
"""What `--stage keep` keeps of each finished stage: enough for every later stage to run from it."""


def stage_keep(root: Path, budget: Budget, seed: int, progress: bool) -> Path:
    """The finished VAE, text and teacher stages, compact (the teacher in fp16, no optimizer states), and the
    study's rows so far, at ROOT/kept: ~30 MB that a later session copies into a new root
    (`cp -r ROOT/kept/. NEW_ROOT/`) to distil and evaluate students without training the teacher again
    (~2 hours). The repository keeps one in `artifacts/recipe-shapes` (its README says which teacher it is)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    out = root / "kept"
    shutil.rmtree(out, ignore_errors=True)
    for stage, parts in KEPT.items():
        _require(root / stage, stage)
        (out / stage).mkdir(parents=True)
        shutil.copy2(root / stage / "done.json", out / stage / "done.json")
        for part in parts:
            if stage == "teacher":
                teacher = StableDiffusionPipeline.from_pretrained(root / stage / part, torch_dtype=torch.float16)
                save_pretrained(teacher, out / stage / part, safe_serialization=True)
            else:
                shutil.copytree(root / stage / part, out / stage / part)
    rows = root / "eval" / "results.jsonl"  # the study's rows so far: the eval stage resumes after them
    if rows.is_file():
        (out / "eval").mkdir()
        shutil.copy2(rows, out / "eval" / rows.name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"wrote {out} ({size:.1f} MB): copy it into a new root with  cp -r {out}/. NEW_ROOT/", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbokit recipe shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except TurbokitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        choices=(*STAGES, "all", "ship", "keep"),
        default="all",
        help="one stage, every stage in order, ship: the student in fp16 as the package ships it, or keep: "
        "the finished VAE, text and teacher stages, compact, for a later session (default: %(default)s)",
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where every stage's output goes (default: %(default)s)")
    parser.add_argument(
        "--runs",
        default="",
        help=f"the distill stage's runs, comma-separated, in this order (default: all: {','.join(DISTILL_RUNS)})",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> None:
    if args.scale <= 0:
        raise TurbokitError(f"--scale must be positive, not {args.scale}")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    budget = Budget().scaled(args.scale)
    runs = [r for r in args.runs.split(",") if r]
    if unknown := set(runs) - set(DISTILL_RUNS):
        raise TurbokitError(f"unknown distill run(s) {sorted(unknown)}; the runs are {', '.join(DISTILL_RUNS)}")
    stage_functions = {name: globals()[f"stage_{name}"] for name in (*STAGES, "ship", "keep")}
    stage_functions["distill"] = functools.partial(stage_distill, runs=runs or None)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for name in stages:
        started = time.perf_counter()
        print(f"== stage {name} ({root})", file=sys.stderr, flush=True)
        stage_functions[name](root, budget, args.seed, not args.quiet)
        elapsed = time.perf_counter() - started
        timings = root / "timings.json"
        recorded = json.loads(timings.read_text()) if timings.is_file() else {}
        recorded[name] = recorded.get(name, 0.0) + elapsed
        timings.write_text(json.dumps(recorded, indent=2) + "\n")
        print(f"== stage {name} done in {elapsed / 60:.1f} min", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
