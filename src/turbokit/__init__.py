"""turbokit: run, make and check Turbo (adversarially distilled, 1–4 step) diffusion models."""

from turbokit.errors import TurbokitError
from turbokit.pipeline import GenerationResult, TurboPipeline

__version__ = "0.1.0"
__all__ = ["GenerationResult", "TurboPipeline", "TurbokitError", "__version__"]
