"""The shapes evaluator (issue 4 §4): FID against the Gaussian closed form, alignment that checks exactly
what a caption says, per-attribute accuracy, a short training run well above chance, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turbokit.errors import TurbokitError
from turbokit.recipes.evaluator import (
    ShapesEvaluator,
    alignment,
    as_batch,
    evaluate_images,
    extract_features,
    frechet_distance,
    gaussian_frechet_distance,
    per_attribute_accuracy,
    predict,
    render_split,
    train_evaluator,
)
from turbokit.recipes.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, example, render

# ---------------------------------------------------------------------------------------------- FID


def test_frechet_distance_of_1d_gaussians_is_the_closed_form():
    # (μa − μb)² + (σa − σb)²
    assert gaussian_frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == (
        pytest.approx(4 + 1)
    )


def test_frechet_distance_of_2d_gaussians_with_non_commuting_covariances():
    cov_a, cov_b = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    mu_a, mu_b = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    # tr √M = √(tr M + 2 √det M) for a 2×2 M with real non-negative eigenvalues, here M = Σa Σb
    product = cov_a @ cov_b
    trace_root = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = 8 + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    assert gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-12)
    assert gaussian_frechet_distance(mu_b, cov_b, mu_a, cov_a) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_samples_matches_their_distributions():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal([1.0, 0.0], [1.0, 2.0], size=(20000, 2))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # 1² + (1 − 2)² from the closed form, up to sampling error
    assert frechet_distance(a, b) == pytest.approx(2.0, abs=0.1)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(frechet_distance(a, b))


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    features = np.random.default_rng(1).normal(size=(20, 64))  # singular covariances
    # √ of the ~44 round-off eigenvalues (≈ 1e-13 each) leaves ~1e-5: singular FIDs are exact only to that
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(features, features + 1) == pytest.approx(64.0, abs=1e-4)


def test_frechet_distance_rejects_a_single_sample():
    with pytest.raises(TurbokitError, match="N ≥ 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------------------------- alignment


def _object(shape: str, colour: str, size: str, position: str) -> dict[str, int]:
    return {
        "shape": SHAPES.index(shape),
        "colour": list(COLOURS).index(colour),
        "size": list(SIZES).index(size),
        "position": POSITIONS.index(position),
    }


ONE = {
    "background": list(BACKGROUNDS).index("white"),
    "relation": None,
    "objects": [_object("circle", "red", "large", "top left corner")],
}
TWO = {
    "background": list(BACKGROUNDS).index("gray"),
    "relation": None,
    "objects": [
        _object("circle", "red", "large", "top left corner"),
        _object("square", "blue", "small", "top right corner"),
    ],
}


@pytest.mark.parametrize(
    ("caption", "aligned"),
    [
        ("a red circle", True),  # size, position and background unsaid: not required
        ("a large red circle in the top left corner on a white background", True),
        ("a small red circle", False),
        ("a blue circle", False),
        ("a red square", False),
        ("a red circle at the bottom", False),
        ("a red circle on a black background", False),
        ("a red circle and a blue square", False),  # one object shown, two said
    ],
)
def test_alignment_of_one_object(caption, aligned):
    assert alignment(ONE, caption) is aligned


@pytest.mark.parametrize(
    ("caption", "aligned"),
    [
        ("a red circle and a blue square", True),
        ("a blue square and a red circle", True),
        ("a red circle to the left of a blue square", True),
        ("a blue square to the right of a small blue square", False),
        ("a blue square to the right of a red circle", True),
        ("a red circle to the right of a blue square", False),
        ("a red circle above a blue square", False),  # same row
        ("a red circle in the top left corner and a blue square at the top", False),
        ("a red circle", False),  # two objects shown, one said
    ],
)
def test_alignment_of_two_objects_and_their_relation(caption, aligned):
    assert alignment(TWO, caption) is aligned


def test_alignment_against_full_labels_needs_everything():
    scene, text = example("test", 3)
    truth = scene.labels()
    assert alignment(truth, truth) and alignment(truth, text)
    wrong = {**truth, "objects": [{**o, "size": (o["size"] + 1) % len(SIZES)} for o in truth["objects"]]}
    assert not alignment(wrong, truth)


def test_per_attribute_accuracy_counts_only_what_is_said():
    accuracy = per_attribute_accuracy([ONE, ONE], ["a blue circle", "a red circle on a white background"])
    assert accuracy["shape"] == 1.0 and accuracy["colour"] == 0.5 and accuracy["count"] == 1.0
    assert accuracy["background"] == 1.0
    assert math.isnan(accuracy["size"]) and math.isnan(accuracy["position"])
    # the said object missing from the prediction counts as wrong on every attribute it states
    missing = per_attribute_accuracy([ONE], ["a red circle and a large blue square"])
    assert missing["shape"] == 0.5 and missing["size"] == 0.0 and missing["count"] == 0.0


# ---------------------------------------------------------------------------------------------- the network


def test_as_batch_reads_pil_images_and_resizes():
    images, _, _ = render_split("test", 2)
    pil = [render(example("test", i)[0]) for i in range(2)]
    assert torch.equal(as_batch(pil), as_batch(images))
    assert as_batch(torch.rand(3, 3, 128, 128)).shape == (3, 3, 64, 64)


@pytest.fixture(scope="module")
def trained() -> ShapesEvaluator:
    return train_evaluator(num_samples=1500, steps=400, batch_size=32, progress=False)


def test_short_training_is_well_above_chance(trained):
    images, labels, captions = render_split("test", 300)
    predictions = predict(trained, images)
    first = next(i for i, p in enumerate(predictions) if p["objects"])
    assert set(predictions[first]) == set(labels[first])
    assert set(predictions[first]["objects"][0]) == set(labels[first]["objects"][0])
    accuracy = per_attribute_accuracy(predictions, labels)
    # measured after 400 steps: background 1.0, colour 0.62, position 0.75, count 0.62; chance 1/8, 1/8, 1/9
    # (with coloured backgrounds it finds the objects later: after 250 steps it saw none in 2 of 3 images)
    assert accuracy["background"] > 0.8 and accuracy["colour"] > 0.5 and accuracy["position"] > 0.6
    row = evaluate_images(trained, images, captions, extract_features(trained, render_split("test", 300, start=300)[0]))
    assert row["fid"] >= 0 and 0 <= row["alignment"] <= 1 and row["colour"] > 0.5


def test_save_and_load_give_identical_predictions(trained, tmp_path):
    images, _, _ = render_split("heldout", 64)
    loaded = ShapesEvaluator.load(trained.save(tmp_path / "evaluator"))
    assert predict(loaded, images) == predict(trained, images)
    assert np.array_equal(extract_features(loaded, images), extract_features(trained, images))


def test_load_from_an_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(TurbokitError, match=r"config\.json"):
        ShapesEvaluator.load(tmp_path)
