"""`--compile openvino`: the same images as eager (exactly in fp32, within bf16 rounding in bf16), converted once."""

from __future__ import annotations

import builtins
import json
import os

import pytest
import torch

from turbokit.cli import main
from turbokit.compile import check_compile
from turbokit.converted import Converted
from turbokit.errors import TurbokitError
from turbokit.pipeline import TurboPipeline
from turbokit.quantize import quality_check
from turbokit.tiny import tiny_autoencoder_tiny

pytest.importorskip("openvino", reason="turbokit[openvino] is part of the dev extra; installed by make test")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def models_in(cache) -> list[str]:
    return sorted(p.parent.name.split("-ov")[0].rsplit("-", 1)[0] + "/" + p.stem for p in cache.rglob("*.xml"))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_fp32_matches_eager(tiny_models, cache, family):
    kwargs = dict(steps=2, seed=[0, 1])
    prompts = ["a red circle", "a cat"]
    eager = TurboPipeline.from_pretrained(tiny_models[family], dtype="fp32")(prompts, **kwargs)
    ov = TurboPipeline.from_pretrained(tiny_models[family], dtype="fp32", compile="openvino")(prompts, **kwargs)
    converted = [name.split("/")[0] for name in models_in(cache)]  # one shape each: it did run OpenVINO
    encoders = ["text-encoder-1", "text-encoder-2"] if family == "sdxl" else ["text-encoder-1"]
    assert converted == sorted([*encoders, "unet", "vae-decoder"])
    assert (ov.pixels - eager.pixels).abs().max() < 1 / 255
    assert (ov.latents - eager.latents).abs().max() < 1e-3


def test_bf16_within_rounding_and_converted_once(tiny_models, cache, monkeypatch):
    kwargs = dict(steps=1, seed=[0])
    reference = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="fp32")(["a red circle"], **kwargs).pixels
    eager = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16")(["a red circle"], **kwargs).pixels
    cold = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="openvino")
    assert not next(cold.unet.parameters()).is_meta  # nothing converted yet: the weights are read
    first = cold(["a red circle"], **kwargs)
    assert cold.encode(["a cat"]).embeds.dtype == torch.bfloat16  # as eager: the UNet's cache key depends on it
    assert next(cold.unet.parameters()).is_meta  # converted: the eager copy is freed (it can be read again)
    rounding = (eager - reference).abs().mean()
    assert (first.pixels - reference).abs().mean() < 3 * rounding + 1 / 255
    assert not torch.equal(first.pixels, eager)  # bf16 kernels of another engine round differently
    files = models_in(cache)

    import openvino

    convert = openvino.convert_model

    def no_convert(*args, **kwargs):
        raise AssertionError("a second launch must not convert again")

    monkeypatch.setattr(openvino, "convert_model", no_convert)
    pipe = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="openvino")
    assert isinstance(pipe.unet, Converted)  # the warm launch did not even read the UNet's weights
    again = pipe(["a red circle"], **kwargs)
    assert torch.equal(again.pixels, first.pixels)
    assert models_in(cache) == files
    with pytest.raises(AssertionError, match="must not convert"):  # a new shape needs a conversion
        pipe(["a red circle"], width=48, height=48, **kwargs)
    monkeypatch.setattr(openvino, "convert_model", convert)
    small = pipe(["a red circle"], width=48, height=48, **kwargs).pixels  # reads the weights, converts 48²
    small_eager = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16")
    reference = small_eager(["a red circle"], width=48, height=48, **kwargs).pixels
    assert small.shape == reference.shape and (small - reference).abs().mean() < 3 / 255


def test_cache_key_follows_the_weights_files(tiny_models, tmp_path):
    import shutil

    from turbokit.openvino_backend import folder_fingerprint

    copy = tmp_path / "unet"
    shutil.copytree(tiny_models["sd2"] / "unet", copy)
    before = folder_fingerprint(copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"_name_or_path": "elsewhere"}))
    assert folder_fingerprint(copy) == before  # bookkeeping is not identity
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten weights
    assert folder_fingerprint(copy) != before


def test_tiny_decoder_runs_in_openvino(tiny_models, cache, tmp_path):
    tiny_autoencoder_tiny().save_pretrained(tmp_path / "taesd")
    kwargs = dict(steps=1, seed=[0])
    eager = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="fp32", tiny_vae=tmp_path / "taesd")
    ov = TurboPipeline.from_pretrained(
        tiny_models["sd2"], dtype="fp32", tiny_vae=tmp_path / "taesd", compile="openvino"
    )
    a, b = eager(["a dog"], **kwargs).pixels, ov(["a dog"], **kwargs).pixels
    assert (a - b).abs().max() < 1 / 255
    assert [name.split("/")[0] for name in models_in(cache)] == ["text-encoder-1", "tiny-decoder", "unet"]


def test_int8_is_calibrated_once_per_shape_and_close_to_bf16(tiny_models, cache, monkeypatch):
    bf16 = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="openvino")
    int8 = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="openvino", quantize="int8")
    calls = []
    dispatcher = int8.unet.forward  # the OpenVINO dispatcher stands in for the UNet's forward
    calibrate = dispatcher.calibrate
    dispatcher.calibrate = lambda args, kwargs: calls.append(args[0].shape) or calibrate(args, kwargs)
    quality = quality_check(int8, bf16, ["a red circle", "a cat", "a blue square on a white background"])
    assert 30 < quality < 100  # the bar; 100 would mean nothing was quantized
    assert calls == [torch.Size([1, 4, 8, 8])]  # calibrated once, at the call's latent shape
    quantized = list(cache.rglob("*-int8.xml"))
    assert len(quantized) == 1 and "FakeQuantize" in quantized[0].read_text()  # int8 ranges in the graph
    again = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="openvino", quantize="int8")
    again.unet.forward.calibrate = lambda *a: pytest.fail("the int8 model is cached: no second calibration")
    assert torch.equal(again("a red circle", seed=0).pixels, int8("a red circle", seed=0).pixels)


def test_refusals_are_one_clear_error(tiny_models, monkeypatch, capsys):
    with pytest.raises(TurbokitError, match="runs on the cpu, not cuda"):
        check_compile("openvino", torch.device("cuda"))
    real_import = builtins.__import__

    def without_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_openvino)
    assert main(["generate", "x", "-m", str(tiny_models["sd2"]), "--compile", "openvino", "-q"]) != 0
    err = capsys.readouterr().err
    assert "pip install 'turbokit[openvino]'" in err and "Traceback" not in err


def test_a_warm_launch_prefetches_what_the_last_one_compiled(tiny_models, cache):
    from pathlib import Path

    from turbokit import openvino_warm

    model, kwargs = tiny_models["sd2"], dict(steps=1, seed=[0])
    first = TurboPipeline.from_pretrained(model, dtype="fp32", compile="openvino")(["a red circle"], **kwargs)
    record = cache / "launches" / f"{openvino_warm.launch_key(model, 'fp32', None)}.json"
    compiled = [
        Path(entry["xml"]).parent.name.split("-ov")[0].rsplit("-", 1)[0] for entry in json.loads(record.read_text())
    ]
    assert compiled == ["text-encoder-1", "unet", "vae-decoder"]  # in the order the first image needed them

    # the next launch: compiled in the background before the pipeline exists, then taken by its dispatchers
    openvino_warm.start(model, "fp32", None).join()
    assert len(openvino_warm._PREFETCHED) == 3
    second = TurboPipeline.from_pretrained(model, dtype="fp32", compile="openvino")(["a red circle"], **kwargs)
    assert not openvino_warm._PREFETCHED  # all three taken
    assert torch.equal(second.pixels, first.pixels)

    # other options, a missing model or an unreadable record: nothing to prefetch, and no error
    assert openvino_warm.start(model, "bf16", None) is None
    entries = json.loads(record.read_text())
    Path(entries[1]["xml"]).unlink()
    openvino_warm.start(model, "fp32", None).join()
    assert len(openvino_warm._PREFETCHED) == 2  # the UNet's IR is gone: it is converted again when needed
    openvino_warm._PREFETCHED.clear()
    record.write_text("{not json")
    assert openvino_warm.start(model, "fp32", None) is None


def test_the_cli_starts_the_prefetch_before_the_heavy_imports(tiny_models, cache, tmp_path):
    import subprocess
    import sys

    # a fresh process: whether diffusers (and transformers, peft, ...: most of a launch's imports) is loaded yet
    # when the CLI starts the prefetch
    probe = (
        "import sys; from turbokit import openvino_warm; "
        "openvino_warm.start = lambda *a: print('started', a, 'diffusers' in sys.modules); "
        "from turbokit.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "x.png"
    command = [sys.executable, "-c", probe, "generate", "a red circle", "-m", str(tiny_models["sd2"])]
    command += ["--compile", "openvino", "-o", str(out), "-q"]
    env = {**os.environ, "TURBOKIT_CACHE": str(cache.parent)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"started ('{tiny_models['sd2']}', 'auto', None) False"
    assert out.is_file()
