"""Resumable checkpoints, written atomically and pruned to a limit.

A checkpoint is accelerate's `save_state` folder (student, EMA, discriminator heads, both
optimizers and LR schedulers, every process's RNG states, and the registered training state with
the step and the data position). It is written under a temporary name and renamed into place as
the last act, so a crash during a save never leaves a `checkpoint-N` that looks valid.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from turbokit.errors import TurbokitError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder that `--resume_from_checkpoint` names ('latest' → newest; None if there is none)."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume
    if not path.is_dir() or not _NAME.match(path.name):
        raise TurbokitError(f"--resume_from_checkpoint {resume}: no checkpoint folder there (expected checkpoint-N)")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int = 0) -> Path:
    """Save every process's state for `step`; rename into place; keep the newest `total_limit`."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a crash during an earlier save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit > 0:
            for old in checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
