"""The compiled path (`--compile`): same images as eager within bf16 tolerance, kernels in turbokit's cache."""

from __future__ import annotations

import pytest
import torch

from turbokit.cli import main
from turbokit.compile import use_disk_cache
from turbokit.errors import TurbokitError
from turbokit.pipeline import TurboPipeline


def test_compiled_pipeline_matches_eager(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.utils.counters.clear()  # the graph count below is this test's own
    eager = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16")
    compiled = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="default")
    kwargs = dict(steps=2, seed=[0, 1])
    reference = eager(["a red circle", "a cat"], **kwargs).pixels
    first = compiled(["a red circle", "a cat"], **kwargs).pixels
    again = compiled(["a blue square", "a dog"], **kwargs).pixels  # same shapes: no recompilation needed
    assert (first - reference).abs().max() < 4 / 255  # bf16: kernels fuse and round differently
    assert not torch.equal(first, reference)  # it did run compiled code
    assert not torch.equal(first, again)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert any((tmp_path / "cache" / "inductor").iterdir())  # kernels in turbokit's cache, not /tmp


def test_a_users_inductor_cache_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TURBOKIT_CACHE", str(tmp_path / "turbokit"))
    assert use_disk_cache() == tmp_path / "mine"


def test_unknown_compile_mode_is_one_clear_error(tiny_models, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse: usage line, one error line, exit 2
        main(["generate", "x", "-m", str(tiny_models["sd2"]), "--compile", "fastest", "-q"])
    assert exit_.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err
    with pytest.raises(TurbokitError, match="unknown compile mode"):
        TurboPipeline.from_pretrained(tiny_models["sd2"], compile="fastest")
    with pytest.raises(TurbokitError, match="aot with --quantize int8 is not supported"):
        TurboPipeline.from_pretrained(tiny_models["sd2"], compile="aot", quantize="int8")


def test_aot_packages_are_built_once_and_reloaded(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    kwargs = dict(steps=1, seed=[0])
    reference = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16")(["a red circle"], **kwargs).pixels
    first = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="aot")(["a red circle"], **kwargs)
    packages = sorted((tmp_path / "cache" / "aot").rglob("*.pt2"))
    assert [p.parent.name.split("-")[0] for p in packages] == ["unet", "vae"]  # one per module and shape
    assert (first.pixels - reference).abs().max() < 4 / 255

    def no_export(*args, **kwargs):
        raise AssertionError("a warm start must not export or compile again")

    monkeypatch.setattr(torch.export, "export", no_export)  # a new pipeline, as in a second launch
    again = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="bf16", compile="aot")(["a red circle"], **kwargs)
    assert torch.equal(again.pixels, first.pixels)
    assert sorted((tmp_path / "cache" / "aot").rglob("*.pt2")) == packages


def test_aot_keys_on_the_weights(tiny_models):
    from turbokit.aot import weights_fingerprint

    unet = TurboPipeline.from_pretrained(tiny_models["sd2"], dtype="fp32").unet
    before = weights_fingerprint(unet)
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)  # a fine-tuned model must not load another's package
    assert weights_fingerprint(unet) != before
