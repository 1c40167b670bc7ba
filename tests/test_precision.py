"""Device and dtype choice: fast by default, never an fp16 VAE."""

from __future__ import annotations

import pytest
import torch

from turbokit import precision as precision_module
from turbokit.errors import TurbokitError
from turbokit.precision import choose_precision, cpu_has_native_bf16, parse_device, training_mixed_precision


def test_cpu_uses_bf16_only_with_hardware_support():
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    precision = choose_precision(torch.device("cpu"))
    assert precision.compute == precision.vae == expected


def test_fp16_never_runs_the_vae_in_fp16():
    precision = choose_precision(torch.device("cpu"), "fp16", vae_force_upcast=True)
    assert precision.compute == torch.float16 and precision.vae in (torch.float32, torch.bfloat16)
    assert choose_precision(torch.device("cpu"), "fp16", vae_force_upcast=False).vae == torch.float16


def test_cuda_default_is_fp16_with_a_safe_vae(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    precision = choose_precision(torch.device("cuda"))
    assert precision.compute == torch.float16 and precision.vae == torch.float32


def test_explicit_dtype_overrides():
    assert choose_precision(torch.device("cpu"), "fp32").compute == torch.float32
    with pytest.raises(TurbokitError, match="unknown dtype"):
        choose_precision(torch.device("cpu"), "int4")


def test_unavailable_devices_are_user_errors():
    assert parse_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TurbokitError, match="no CUDA GPU"):
            parse_device("cuda")
    with pytest.raises(TurbokitError, match="unknown device"):
        parse_device("tpu9")


@pytest.mark.parametrize("native", [True, False])
def test_training_uses_bf16_only_where_the_hardware_runs_it(monkeypatch, native):
    """Emulated bf16 made a recipe step 14× slower than fp32 on an AVX2 CPU."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert training_mixed_precision(torch.device("cpu")) == ("bf16" if native else "no")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert training_mixed_precision(torch.device("cuda")) == ("bf16" if native else "no")
    assert training_mixed_precision(torch.device("mps")) == "no"
