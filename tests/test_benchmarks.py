"""The benchmark scripts still run (tiny sizes): they import the trainer's internals and would rot silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_distillation_benchmark_runs_on_tiny_models():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_distill.py"),
            "--size",
            "tiny",
            "--method",
            "both",
            "--steps",
            "1",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step / parts" in proc.stdout and "| add |" in proc.stdout and "| ladd" in proc.stdout
