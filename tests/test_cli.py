"""The command line: what it writes, and one clear line with a non-zero exit for every user error."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from turbokit.cli import main, output_paths, parse_size
from turbokit.errors import InvalidRequestError
from turbokit.metadata import read_parameters


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_pngs_that_carry_their_parameters(tiny_models, tmp_path, capsys):
    target = tmp_path / "cat.png"
    code, _, err = run(
        capsys,
        "generate",
        "a cat, sitting",
        "-m",
        str(tiny_models["sd2"]),
        "--seed",
        "5",
        "-n",
        "2",
        "--steps",
        "2",
        "--size",
        "96x64",
        "-o",
        str(target),
        "-q",
    )
    assert code == 0, err
    for i, seed in enumerate((5, 6)):
        path = tmp_path / f"cat-{i}.png"
        assert Image.open(path).size == (96, 64)
        params = read_parameters(path)
        assert (params.prompt, params.seed, params.steps, params.width) == ("a cat, sitting", seed, 2, 96)
        assert params.model == "sd2"


def test_same_command_same_image(tiny_models, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        assert (
            run(
                capsys, "generate", "x", "-m", str(tiny_models["sdxl"]), "--seed", "3", "-o", str(tmp_path / name), "-q"
            )[0]
            == 0
        )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_img2img_writes_strength(tiny_models, tmp_path, capsys):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "in.jpg")
    code, _, err = run(
        capsys,
        "img2img",
        str(tmp_path / "in.jpg"),
        "a star",
        "-m",
        str(tiny_models["sd2"]),
        "--strength",
        "0.5",
        "--steps",
        "2",
        "--seed",
        "1",
        "-o",
        str(tmp_path / "out.png"),
        "-q",
    )
    assert code == 0, err
    assert read_parameters(tmp_path / "out.png").strength == 0.5


def test_info_describes_the_model(tiny_models, capsys):
    code, out, _ = run(capsys, "info", str(tiny_models["sdxl"]), "--dtype", "fp32")
    assert code == 0
    assert "sdxl (SDXL)" in out and "64x64" in out and "EulerAncestralDiscreteScheduler" in out
    assert "text_encoder_2" in out and "fp32" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "-m", "/no/such/model"], "model not found"),
        (["generate", "x", "--size", "100x100"], "multiples of 8"),  # checked before loading
        (["generate", "x", "--size", "big"], "WIDTHxHEIGHT"),
        (["generate", "x", "--steps", "0"], "steps must be between"),
        (["generate", "x", "-o", "picture.jpg"], ".png"),
        (["img2img", "/no/such.png", "x", "--steps", "2"], "/no/such.png"),
        (["img2img", "IMAGE", "x", "--steps", "1", "--strength", "0.5"], "int(steps × strength)"),
        (["img2img", "IMAGE", "x", "--strength", "1.5"], "strength must be in"),
    ],
)
def test_user_errors_give_one_line_and_exit_2(argv, message, tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "IMAGE", format="PNG")
    argv = [*argv, "-m", str(tiny_models["sd2"])] if "-m" not in argv else argv
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_input_image_is_a_clear_error(tiny_models, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code, _, err = run(capsys, "img2img", str(tmp_path / "broken.png"), "x", "-m", str(tiny_models["sd2"]))
    assert code == 2 and "broken.png" in err and "Traceback" not in err


def test_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "turbokit", "generate", "x", "-m", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model not found") and "Traceback" not in proc.stderr


def test_default_output_names_never_overwrite(tmp_path):
    (tmp_path / "turbokit-7.png").write_bytes(b"earlier work")
    paths = output_paths(str(tmp_path), [7, 8])
    assert paths == [tmp_path / "turbokit-7-1.png", tmp_path / "turbokit-8.png"]


def test_parse_size():
    assert parse_size("512x768") == (512, 768)
    assert parse_size("640") == (640, 640)
    with pytest.raises(InvalidRequestError):
        parse_size("512 by 512")
