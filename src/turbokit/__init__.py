"""turbokit: run, make and check Turbo (adversarially distilled, 1–4 step) diffusion models."""

import logging

# diffusers imports torchao whenever it is installed (turbokit[int8]), and torchao then warns, at import, that
# its CUDA kernels do not load on a CPU build, diffusers that some of its tensor classes are gone, and torch
# about a deprecated registration: nothing a user can act on, printed before any turbokit output.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
del _name

from typing import TYPE_CHECKING  # noqa: E402

from turbokit.errors import TurbokitError  # noqa: E402 (after the loggers above)

if TYPE_CHECKING:
    from turbokit.pipeline import GenerationResult, TurboPipeline

__version__ = "0.1.0"
__all__ = ["GenerationResult", "TurboPipeline", "TurbokitError", "__version__"]


def __getattr__(name: str) -> object:
    # the pipeline (torch, diffusers: seconds of imports) loads on first use, so that `turbokit.cli` can start
    # work first: a warm `--compile openvino` launch loads OpenVINO's models while these imports run
    if name in ("GenerationResult", "TurboPipeline"):
        from turbokit import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'turbokit' has no attribute {name!r}")
