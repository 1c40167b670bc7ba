"""The benchmark scripts still run (tiny sizes): they import the trainer's internals and would rot silently."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from turbokit.precision import choose_precision

ROOT = Path(__file__).resolve().parents[1]
OPENVINO_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
needs_openvino = pytest.mark.skipif(
    not OPENVINO_PYTHON.exists(),
    reason=f"{OPENVINO_PYTHON.parent.parent} is missing: `make bench-openvino-env` creates it (optimum-intel's venv)",
)


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


def run_inference_benchmark(*options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_inference.py"), "--tiny", "--repeats", "1", *options]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_inference_benchmark_runs_on_a_tiny_model():
    out = run_inference_benchmark().stdout
    assert "| diffusers fp32 (default) |" in out and "| turbokit fp32 |" in out
    assert "turbokit default vs diffusers default" in out


def test_inference_benchmark_compiled_rows_with_parts(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("TURBOKIT_CACHE", str(tmp_path))  # inherited by the benchmark's process
    out = run_inference_benchmark("--compile", "openvino", "--tiny-decoder", "--no-fp32", "--unfused").stdout
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| turbokit")]
    fast = {torch.bfloat16: "bf16", torch.float32: "fp32"}[choose_precision(torch.device("cpu")).compute]
    assert rows == [
        f"turbokit default ({fast})",
        f"turbokit default ({fast}) + tiny decoder",
        f"turbokit default ({fast}), upsamplers unfused",
        f"turbokit --compile openvino ({fast})",
        f"turbokit --compile openvino ({fast}) + tiny decoder",
    ]
    assert "fp32 (default)" not in out
    parts = [line for line in out.splitlines() if "median s per component" in line]
    assert len(parts) == 5 and all("unet" in line and "vae_decode" in line for line in parts)
    converted = sorted(p.parent.name.split("-")[0] for p in tmp_path.rglob("*.xml"))
    assert converted == ["text", "tiny", "unet", "vae"]  # every module in OpenVINO IR, one shape each


def test_upsample_benchmark_compares_fused_and_diffusers_upsamplers(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_upsample.py"), "--tiny", "--unet", "--repeats", "1"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([*command, "--no-openvino"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # its scratch folder is gone (runs used to leave one in /tmp each)
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith(("| vae", "| unet"))]
    assert [[part.strip() for part in r[1].split(",")[:2]] for r in rows] == [
        ["vae decoder", "diffusers upsamplers"],
        ["vae decoder", "fused upsamplers"],
        ["unet", "diffusers upsamplers"],
        ["unet", "fused upsamplers"],
    ]
    # fused or not, each stays within the precision's rounding of the fp32 reference
    assert all(float(r[4]) < 0.05 for r in rows)
    assert re.search(r"vae decoder, eager \w+: fused [\d.]+x as fast", proc.stdout)


def test_throughput_benchmark_reports_each_batch(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_throughput.py"), "--tiny", "--device", "cpu"]
    command += ["--batches", "1,2", "--calls", "3", "--warmup", "1", "--json", str(tmp_path / "out.json")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["images_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert "| 2 |" in proc.stdout and "best:" in proc.stdout


def test_warm_start_benchmark_launches_cold_and_warm(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_warm_start.py"), "--tiny", "--modes", "eager"]
    command += ["--images", "1", "--cache-dir", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| eager |")]
    assert [r[2].strip() for r in rows] == ["cold", "warm"]
    assert all(float(r[3]) > float(r[4]) > 0 for r in rows)  # a launch costs more than one image


def test_warm_start_benchmark_refuses_an_unknown_mode_in_one_line(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_warm_start.py"), "--tiny", "--modes", "eager,fastest"]
    proc = subprocess.run([*command, "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown mode(s) fastest" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any model was built


def test_warm_start_benchmark_shows_why_a_launch_failed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_warm_start

    with pytest.raises(SystemExit) as failed:  # a launch of a folder that does not exist: the child's error shown
        bench_warm_start.launch(tmp_path / "missing", "eager", 64, 1, 1, tmp_path / "cache", False)
    message = str(failed.value.code)
    assert message.startswith("the eager launch failed (exit ") and "missing" in message.split("\n", 1)[1]


@pytest.fixture(scope="module")
def openvino_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """bench_inference.py --tiny --openvino, once: its cache folder (weights and IR) and its output."""
    cache = tmp_path_factory.mktemp("bench-inference")
    return cache, run_inference_benchmark("--openvino", "--cache-dir", str(cache)).stdout


@needs_openvino
def test_inference_benchmark_interleaves_openvino(openvino_cache):
    cache, out = openvino_cache
    assert "exported to IR" in out
    assert "(optimum-intel) |" in out and "median s per component: text_encoder" in out
    assert re.search(r"turbokit default \(\w+\) vs OpenVINO at \w+: [\d.]+x faster", out)
    assert (cache / "tiny-sd2" / "model_index.json").is_file() and (cache / "tiny-sd2-openvino").is_dir()


@needs_openvino
def test_openvino_benchmark_reuses_its_export_and_matches_diffusers(openvino_cache, tmp_path):
    """Run alone on the folder the first test saved: no second export, and at f32 the image diffusers makes."""
    folder = openvino_cache[0] / "tiny-sd2"
    image = tmp_path / "openvino.png"
    command = [str(OPENVINO_PYTHON), str(ROOT / "benchmarks" / "bench_openvino.py"), str(folder), "--size", "64"]
    command += ["--repeats", "2", "--precision", "f32", "--image", str(image), "--prompt", "a red circle"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # one JSON line, nothing else
    assert report["export_s"] is None and report["precision"] == "f32"
    assert report["median_s"] > 0 and set(report["components_median_s"]) == {"text_encoder", "unet", "vae_decode"}

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    reference = pipe("a red circle", num_inference_steps=1, guidance_scale=0, height=64, width=64, generator=generator)
    difference = np.abs(np.asarray(Image.open(image), np.int16) - np.asarray(reference.images[0], np.int16))
    assert difference.max() <= 1  # the same weights (text encoder included) and the same computation
