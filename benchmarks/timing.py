"""Seconds per pipeline component: shared by the benchmarks (turbokit's venv and OpenVINO's alike)."""

from __future__ import annotations

import time


def time_forward(module, name: str, seconds: dict[str, float]) -> None:
    """Wrap `module.forward` (the class's, or an instance's stand-in such as a compiled dispatcher) so that
    each call adds its seconds to `seconds[name]`; the caller resets the dict between pipeline calls."""
    forward = module.forward

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    module.forward = timed
