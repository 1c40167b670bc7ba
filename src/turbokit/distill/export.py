"""Export a distilled student: a diffusers folder with the Turbo scheduler config (loads in turbokit and
in diffusers' AutoPipelineForText2Image), optionally one .safetensors in Stability's layout, and
LoRA weights in the diffusers format when the student was trained as a LoRA."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.schedulers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from torch import nn

from turbokit.compat import save_pretrained
from turbokit.distill.config import DistillConfig
from turbokit.loading import LoadedModel


def turbo_scheduler(
    teacher: LoadedModel, prediction_type: str
) -> EulerDiscreteScheduler | EulerAncestralDiscreteScheduler:
    """The teacher's noise schedule with the Turbo sampling settings: trailing timesteps, Euler for SD
    1.x/2.x and Euler-ancestral for SDXL, as the released sd-turbo / sdxl-turbo configs have; and the
    student's `prediction_type`."""
    config = dict(teacher.components["scheduler"].config)
    config.update(timestep_spacing="trailing", steps_offset=1, prediction_type=prediction_type)
    cls = EulerAncestralDiscreteScheduler if teacher.family == "sdxl" else EulerDiscreteScheduler
    return cls.from_config(config)


def _fp32(module: nn.Module) -> nn.Module:
    """An fp32 view of a frozen part for saving — a copy when it trains in another dtype, because an
    export in mid-run (--export_steps) must not change what the rest of the run computes in."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def export_student(path: Path, teacher: LoadedModel, student: nn.Module, cfg: DistillConfig) -> Path:
    """Write the student as a full diffusers model folder (LoRA merged), plus LoRA/single-file extras."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path.mkdir(parents=True, exist_ok=True)
    unet = student
    if cfg.use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(student))
        StableDiffusionPipeline.save_lora_weights(path / "lora", unet_lora_layers=lora, safe_serialization=True)
        unet = _merged_copy(student)
    c = {k: v for k, v in teacher.components.items() if k not in ("unet", "scheduler")}
    c = {k: (_fp32(v) if isinstance(v, nn.Module) else v) for k, v in c.items()}
    scheduler = turbo_scheduler(teacher, cfg.student_prediction(teacher))
    components = {**c, "unet": unet.float(), "scheduler": scheduler}
    if teacher.family == "sdxl":
        pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    save_pretrained(pipe, path, safe_serialization=True)
    if cfg.export_single_file:
        from turbokit.single_file import save_single_file

        save_single_file(components, teacher.family, path.with_suffix(".safetensors"), dtype=torch.float16)
    info = {"family": teacher.family, "teacher": cfg.teacher, "method": cfg.method, "config": asdict(cfg)}
    (path / "turbokit_distill.json").write_text(json.dumps(info, indent=2, default=str))
    return path


def _merged_copy(student: nn.Module) -> nn.Module:
    """A plain UNet with the LoRA folded into its weights (the student itself keeps its adapter)."""
    import copy

    merged = copy.deepcopy(student)
    merged.fuse_lora()
    merged.unload_lora()
    return merged
