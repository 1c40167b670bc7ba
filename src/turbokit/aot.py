"""Ahead-of-time compiled modules (`--compile aot`, issue 6 §1): a warm start that skips compilation.

`torch.compile` with frozen weights cannot use inductor's FX-graph cache (pre-packed oneDNN weights do not
pickle), so every launch traces and lowers the models again. AOTInductor instead writes the whole compiled
module — kernels, wrapper and frozen weights — to one `.pt2` package; a later launch loads it in about a
second and calls it with no Python tracing at all.

A module's `forward` is replaced by a dispatcher: per call signature (tensor shapes, dtypes and devices,
and the values of every non-tensor argument) it loads the package from turbokit's cache, exporting
(`torch.export`) and compiling it the first time. The key also holds a fingerprint of the weights, the
module's class and config, and the torch version, so a different model or torch never loads a stale
package. Cost: each package holds its own copy of the weights (the module's size, once per shape on
disk and in memory), on top of the eager module, which stays loaded to export new shapes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)


# Part of every compiled artefact's key: bumped when turbokit changes the graph its modules trace to, so
# no cache built before serves the new graph (2: upsamplers as transposed convolutions, `fused_upsample`).
GRAPH_REVISION = 2


def config_identity(config: dict[str, Any]) -> bytes:
    """A config's settings as bytes to hash, without its bookkeeping (`_name_or_path` differs with how the same
    folder was named; `_diffusers_version` with the library that saved it)."""
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str).encode()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a module's weights: class, config, every tensor's name, shape and dtype, and a
    strided sample of its values. Hashing gigabytes at each launch would cost more than the warm start."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(config_identity(config.to_dict() if hasattr(config, "to_dict") else dict(config)))
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:20]


def call_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """What a compiled package is specialised to: tensors by shape, dtype, device and layout; the rest by value."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            channels_last = leaf.dim() == 4 and leaf.is_contiguous(memory_format=torch.channels_last)
            parts.append(f"T{tuple(leaf.shape)}{leaf.dtype}{leaf.device.type}{'cl' if channels_last else ''}")
        else:
            parts.append(repr(leaf))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class _Eager(torch.nn.Module):
    """The module's own (class) forward, for export: the instance's forward is the dispatcher."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


class AotDispatcher:
    """Stands in for `module.forward`: runs the AOTInductor package of each call signature."""

    def __init__(self, module: torch.nn.Module, cache: Path, name: str) -> None:
        self.module, self.name = module, name
        self.folder = cache / f"{name}-{weights_fingerprint(module)}-g{GRAPH_REVISION}-torch{torch.__version__}"
        self.loaded: dict[str, Callable[..., Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = call_signature(args, kwargs)
        if key not in self.loaded:
            self.loaded[key] = self._load_or_build(key, args, kwargs)
        return self.loaded[key](*args, **kwargs)

    def _load_or_build(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any]:
        path = self.folder / f"{key}.pt2"
        if not path.is_file():
            start = time.perf_counter()
            log.info(f"compiling {self.name} ahead of time for this shape (once; cached in {self.folder})")
            with torch.no_grad():
                exported = torch.export.export(_Eager(self.module).eval(), args, kwargs, strict=False)
                self.folder.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".partial-{os.getpid()}.pt2")
                torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(partial), inductor_configs={"freezing": True}
                )
            os.replace(partial, path)  # atomic: a concurrent or killed launch never sees half a package
            log.info(f"compiled {self.name} in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        compiled = torch._inductor.aoti_load_package(str(path))
        log.info(f"loaded compiled {self.name} in {time.perf_counter() - start:.2f} s")
        return compiled


def compile_ahead(module: torch.nn.Module, cache: Path, name: str) -> torch.nn.Module:
    """Make `module` run AOTInductor packages from `cache` (built at the first call of each signature)."""
    module.forward = AotDispatcher(module, cache, name)  # an instance attribute wins over the class's forward
    return module
