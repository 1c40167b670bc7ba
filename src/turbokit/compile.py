"""Compiled paths (issue 6 §1): the UNet, decoder and text encoders through `torch.compile`, cache on disk.

The diffusers model classes stay the source of truth: inductor compiles their forward at static shapes
(a new size or batch compiles again). On the CPU inductor's `freezing` folds the weights into the graph
as constants, which lets oneDNN pre-pack them for its convolution and matmul kernels — the point of
compiling there; it needs inference with no autograd, which is all the pipeline does. (Set in
inductor's process-wide config: passed per module through `torch.compile(options=...)` the frozen
graphs hit the FX-graph cache instead — a sign the oneDNN pre-packing no longer happens; to measure at
full size before choosing.) Inductor's cache goes to `~/.cache/turbokit/inductor` ($TURBOKIT_CACHE overrides the root,
$TORCHINDUCTOR_CACHE_DIR wins over both) instead of torch's /tmp default. With freezing, inductor skips
its FX-graph cache (pre-packed oneDNN weights cannot be pickled), so a second launch still traces and
lowers the models again and only reuses compiled kernels: docs/performance.md has the figures. The
`aot` mode (`turbokit.aot`) is the real warm start: AOTInductor packages of the UNet and decoder, built
once per shape and loaded from `~/.cache/turbokit/aot` by later launches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from turbokit.errors import TurbokitError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads COMPILE_MODES before any model work
    import torch

COMPILE_MODES = ("default", "max-autotune", "reduce-overhead", "aot", "openvino")


def cache_root() -> Path:
    """Where turbokit keeps what it can rebuild: $TURBOKIT_CACHE, else ~/.cache/turbokit."""
    return Path(os.environ.get("TURBOKIT_CACHE") or Path.home() / ".cache" / "turbokit")


def use_disk_cache() -> Path:
    """Point inductor's cache at turbokit's (unless the user chose one) and return it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its /tmp default into the variable the first time it looks, so that value is not a choice
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_compile(mode: str | None, device: torch.device | None = None, quantize: str | None = None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise TurbokitError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    if mode == "aot" and device is not None and device.type not in ("cpu", "cuda"):
        raise TurbokitError(f"--compile aot runs on cpu or cuda, not {device.type}: use --compile default")
    if mode == "openvino":
        if device is not None and device.type != "cpu":
            raise TurbokitError(f"--compile openvino runs on the cpu, not {device.type}: use --compile default or aot")
        from turbokit.openvino_backend import require_nncf, require_openvino

        require_openvino()
        if quantize is not None:  # its int8 comes from NNCF, not torchao
            require_nncf()
    if mode == "aot" and quantize is not None:  # torchao's int8 tensor subclasses are not exported here yet
        raise TurbokitError(f"--compile aot with --quantize {quantize} is not supported yet: use one or the other")


def compile_module(module: torch.nn.Module, device: torch.device, mode: str = "default") -> torch.nn.Module:
    """Compile `module` in place (it keeps its class, config and weights) with inductor at static shapes;
    on the CPU with frozen weights (see the module doc). Compilation happens at the first call.

    `reduce-overhead` (CUDA graphs) only helps on CUDA; on other devices it falls back to `default`."""
    check_compile(mode)
    if device.type == "cpu":
        import torch._inductor.config as inductor

        inductor.freezing = True  # read when a graph compiles; only inference (no_grad) graphs are frozen
    if mode == "reduce-overhead" and device.type != "cuda":
        mode = "default"
    module.compile(mode=mode, dynamic=False)
    return module
