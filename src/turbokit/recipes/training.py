"""What the recipe's own training stages share: resumable runs, deterministic batches, progress with an ETA.

Every stage (VAE, CLIP, teacher) is one `StageRun`: a folder holding the modules' weights, the
optimizer, the step and a `done` marker, saved atomically every few minutes. Batches and noise are drawn
from (seed, step) alone — never from a stateful generator — so a run stopped at any point and resumed
continues exactly as if it had never stopped (tested). Sessions on this machine end without warning:
a stage must lose at most a few minutes of work.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from turbokit.images import pil_to_tensor
from turbokit.recipes.shapes import example, render

SAVE_EVERY_S = 120.0  # a session that ends without warning loses at most this much of a stage


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator drawn from (seed, step, stream) alone, so a resumed run draws what the first would have."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence((seed, step, stream)).generate_state(1)[0]))


def shapes_batch(
    split: str, step: int, batch_size: int, size: int = 64, seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """Batch `step` of an endless stream of never-repeated `shapes` scenes: (B, 3, size, size) in [-1, 1], captions."""
    scenes = [example(split, index, seed) for index in range(step * batch_size, (step + 1) * batch_size)]
    return pil_to_tensor([render(scene, size) for scene, _ in scenes]), [text for _, text in scenes]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def finished(folder: str | Path) -> bool:
    """Whether the run in `folder` finished (`StageRun.finish` wrote its summary)."""
    return (Path(folder) / "done.json").is_file()


class StageRun:
    """A resumable training run of some named modules with one optimizer, in `folder`.

    `folder/state/` holds `<name>.safetensors` per module, `optimizer.pt` and `progress.json`; a save
    writes `state.tmp/` and renames it into place last, so an interrupted save leaves the previous state.
    """

    def __init__(
        self,
        folder: str | Path,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        save_every_s: float | None = None,
        label: str = "",
    ) -> None:
        self.folder = Path(folder)
        self.modules, self.optimizer, self.total_steps = modules, optimizer, total_steps
        self.save_every_s = SAVE_EVERY_S if save_every_s is None else save_every_s
        self.label = label or self.folder.name
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.latest: dict[str, float] = {}

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def done(self) -> bool:
        return finished(self.folder)

    def resume(self) -> int:
        """Load the saved state if there is one; the step to continue from."""
        progress = self.state / "progress.json"
        if not progress.is_file():
            return 0
        for name, module in self.modules.items():
            module.load_state_dict(load_file(self.state / f"{name}.safetensors"))
        self.optimizer.load_state_dict(torch.load(self.state / "optimizer.pt", weights_only=True))
        saved = json.loads(progress.read_text(encoding="utf-8"))
        self.step, self.history = saved["step"], saved.get("history", [])
        return self.step

    def save(self) -> None:
        temporary = self.folder / "state.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        for name, module in self.modules.items():
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                temporary / f"{name}.safetensors",
            )
        torch.save(self.optimizer.state_dict(), temporary / "optimizer.pt")
        progress = {"step": self.step, "total_steps": self.total_steps, "history": self.history}
        (temporary / "progress.json").write_text(json.dumps(progress) + "\n", encoding="utf-8")
        previous = self.folder / "state.old"
        shutil.rmtree(previous, ignore_errors=True)
        if self.state.exists():
            self.state.rename(previous)
        temporary.rename(self.state)
        shutil.rmtree(previous, ignore_errors=True)

    def finish(self, summary: dict) -> None:
        self.save()
        (self.folder / "done.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    def steps(self, log_every: int = 50, progress: bool = True) -> Iterator[int]:
        """The steps left to run; saves every `save_every_s` seconds and prints progress with an ETA.
        The caller reports each step's losses with `log`."""
        started, first, last_save = time.perf_counter(), self.step, time.perf_counter()
        while self.step < self.total_steps:
            yield self.step
            self.step += 1
            now = time.perf_counter()
            if now - last_save >= self.save_every_s:
                self.save()
                last_save = now
            if progress and (self.step % log_every == 0 or self.step == self.total_steps):
                rate = (now - started) / (self.step - first)
                losses = "  ".join(f"{k} {v:.4f}" for k, v in self.latest.items())
                print(
                    f"[{self.label}] step {self.step}/{self.total_steps}  {losses}  "
                    f"{rate:.2f} s/step  ETA {_duration(rate * (self.total_steps - self.step))}",
                    file=sys.stderr,
                    flush=True,
                )

    def log(self, **losses: float) -> None:
        """Record this step's losses (kept every 10 steps in the saved history, for the results)."""
        self.latest = {k: float(v) for k, v in losses.items()}
        if self.step % 10 == 0:
            self.history.append({"step": self.step, **{k: round(v, 5) for k, v in self.latest.items()}})


def set_lr(optimizer: torch.optim.Optimizer, base: float | Sequence[float], multiplier: float) -> None:
    """Every group's learning rate to its base × `multiplier`; `base` is one rate for all groups or one per group."""
    bases = [base] * len(optimizer.param_groups) if isinstance(base, float | int) else list(base)
    for group, rate in zip(optimizer.param_groups, bases, strict=True):
        group["lr"] = rate * multiplier


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1 - decay)
