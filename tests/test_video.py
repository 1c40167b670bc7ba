"""`turbokit video`: every frame restyled, same frame count and rate; bad input is one line."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from turbokit.cli import main
from turbokit.images import fit_size
from turbokit.video import VideoWriter, frames, probe


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "in.mp4"
    writer = VideoWriter(path, 96, 64, Fraction(12))
    for i in range(6):
        writer.write(Image.fromarray(np.full((64, 96, 3), i * 40, dtype=np.uint8)))
    writer.close()
    return path


def test_every_frame_is_restyled_at_the_input_rate(clip, tiny_models, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main(
        [
            "video",
            str(clip),
            str(out),
            "--prompt",
            "a painting",
            "-m",
            str(tiny_models["sd2"]),
            "--steps",
            "2",
            "--strength",
            "0.5",
            "--batch-size",
            "4",
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    info = probe(out)
    # the input's aspect ratio at the model's native area (64² for the tiny model)
    assert (info.width, info.height, info.fps) == (*fit_size(96, 64, 64 * 64), Fraction(12))
    restyled = [np.asarray(f, dtype=np.float32) for f in frames(out)]
    assert len(restyled) == 6
    originals = [np.asarray(f.resize((info.width, info.height)), dtype=np.float32) for f in frames(clip)]
    assert np.abs(restyled[0] - originals[0]).mean() > 5  # the model changed the frames


def test_max_frames(clip, tiny_models, tmp_path):
    out = tmp_path / "short.mkv"
    assert (
        main(["video", str(clip), str(out), "--prompt", "x", "-m", str(tiny_models["sd2"]), "--max-frames", "2", "-q"])
        == 0
    )
    assert len(list(frames(out))) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["MISSING", "OUT.mp4"], "video not found"),
        (["TEXT", "OUT.mp4"], "cannot read video"),
        (["CLIP", "OUT.gif"], ".mp4"),
        (["CLIP", "OUT.mp4", "--steps", "1", "--strength", "0.5"], "int(steps × strength)"),
    ],
)
def test_bad_input_is_one_line(args, message, clip, tmp_path, capsys):
    (tmp_path / "TEXT").write_text("not a video")
    subst = {
        "MISSING": str(tmp_path / "missing.mp4"),
        "TEXT": str(tmp_path / "TEXT"),
        "CLIP": str(clip),
        "OUT.mp4": str(tmp_path / "o.mp4"),
        "OUT.gif": str(tmp_path / "o.gif"),
    }
    code = main(["video", *[subst.get(a, a) for a in args], "--prompt", "x", "-m", "/no/model/needed"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
