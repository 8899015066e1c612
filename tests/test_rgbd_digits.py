"""RGB-D Digits: byte-identical builds from a seed, each digit kind visible only where it claims, void only on
digit borders, strict recipe, a PNG sample figure, and the NYU-Depth-V2 loader reading the build."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

import numpy as np
import pytest
import yaml

from pipeline.data.av_digits import load_mnist_5k
from pipeline.data.nyu_depth_v2 import load
from pipeline.data.rgbd_digits import (KINDS, LIGHT_GAIN, LIGHT_RAMP, MIN_CONTRAST, NUM_CLASSES, VOID_HIGH, VOID_LOW,
                                       RGBDDigitsRecipe, build_scenes, depth_noise_at, digit_alpha, render_scene,
                                       write_rgbd_digits, write_sample_figure)
from pipeline.params import ParamsError, load_blocks

RECIPE = RGBDDigitsRecipe(n_scenes=12, height=32, width=64, digits_min=1, digits_max=3, digit_size_min=0.5,
                          digit_size_max=0.9, p_both=0.4, p_depth_only=0.3, p_rgb_only=0.3, relief_m=0.2, stroke_dilation=0,
                          rgb_noise=0.03, depth_noise_m=0.001, seed=0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def arrays():
    return build_scenes(RECIPE)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rgbd") / "rgbd_digits"
    return folder, write_rgbd_digits(RECIPE, folder)


def test_same_recipe_gives_byte_identical_files(tmp_path, built):
    folder, summary = built
    again = write_rgbd_digits(RECIPE, tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(folder)
    assert sorted(_digest(folder)) == ["labels40.mat", "nyu_depth_v2_labeled.mat"]
    assert again == summary


def test_other_seed_gives_other_scenes(arrays):
    other = build_scenes(dataclasses.replace(RECIPE, seed=1))
    assert other["images"].shape == arrays["images"].shape
    for key in ("images", "depths", "labels"):
        assert not np.array_equal(other[key], arrays[key])


def test_a_scene_does_not_depend_on_the_number_of_scenes(arrays):
    fewer = build_scenes(dataclasses.replace(RECIPE, n_scenes=3))
    for key in ("images", "depths", "labels", "kinds"):
        assert np.array_equal(fewer[key], arrays[key][:3])


def test_shapes_dtypes_ranges_and_summary(arrays, built):
    n, h, w = RECIPE.n_scenes, RECIPE.height, RECIPE.width
    assert arrays["images"].shape == (n, h, w, 3) and arrays["images"].dtype == np.uint8
    assert arrays["depths"].shape == (n, h, w) and arrays["depths"].dtype == np.float32
    assert arrays["labels"].shape == (n, h, w) and arrays["labels"].min() >= 0
    assert arrays["labels"].max() < NUM_CLASSES == 12
    # the plane stays in 2.5..6 m, raised digits stand at most 2·relief in front; noise grows with depth²
    low = 2.5 - 2 * RECIPE.relief_m - depth_noise_at(2.5, RECIPE.depth_noise_m)
    assert low <= arrays["depths"].min() and arrays["depths"].max() <= 6 + depth_noise_at(6, RECIPE.depth_noise_m)
    per_scene = np.bincount(arrays["digit_scene"], minlength=n)
    assert per_scene.min() >= RECIPE.digits_min and per_scene.max() <= RECIPE.digits_max
    summary = built[1]
    assert sum(summary["pixels_per_label"].values()) == n * h * w
    assert summary["pixels_per_label"]["void"] == int((arrays["labels"] == 0).sum())
    assert sum(summary["digits_per_kind"].values()) == sum(summary["digits_per_class"]) == summary["digits"]
    assert summary["digits"] == len(arrays["digit_class"]) == per_scene.sum()
    digit_pixels = int((arrays["labels"] >= 2).sum())
    assert sum(summary["labelled_digit_pixels_per_kind"].values()) == digit_pixels
    assert abs(sum(summary["pixel_share_per_label"].values()) - 1) < 1e-3


def test_digit_alpha_is_area_averaged_coverage():
    block = np.zeros((28, 28), np.uint8)
    block[:2, :2] = 255  # a 2×2 white block in the top-left corner
    assert np.array_equal(digit_alpha(np.full(784, 255, np.uint8), 14), np.ones((14, 14)))
    quarter = digit_alpha(block.ravel(), 7)  # each output pixel averages 4×4 input pixels
    assert quarter[0, 0] == 0.25 and quarter.sum() == 0.25
    # 28 -> 10: output pixel (0,0) covers input [0, 2.8)², holding the whole block: 4 / 2.8²
    tenth = digit_alpha(block.ravel(), 10)
    assert tenth[0, 0] == pytest.approx(4 / 2.8**2, abs=1e-15) and tenth[1:, :].sum() == 0
    assert tenth.sum() == pytest.approx(4 * 100 / 784, abs=1e-12)  # coverage is conserved (area × scale²)


CORE = 0.99  # coverage of a digit's core pixels (few MNIST strokes are 255 throughout a resampled pixel)


def _isolated_core(scene, d) -> np.ndarray:
    """Pixels covered at least CORE by digit d and not at all by another digit of the scene."""
    others = sum((o.alpha for o in scene.digits if o is not d), np.zeros_like(d.alpha))
    return (d.alpha >= CORE) & (others == 0.0)


def test_each_kind_is_visible_in_the_modalities_it_claims_only(mnist):
    noise_255 = RECIPE.rgb_noise * 255 + 0.5  # uniform noise, then rounding to uint8
    # lit contrast of a distinct colour >= MIN_CONTRAST × coverage × the least light, less noise and rounding
    least_light = LIGHT_GAIN[0] * (1 - 2 * LIGHT_RAMP)
    contrast = MIN_CONTRAST * CORE * least_light - np.sqrt(3) * noise_255 / 255
    float32_eps = 6.5 * 2.0**-23
    seen = {kind: 0 for kind in KINDS}
    for index in range(60):
        scene = render_scene(RECIPE, index, *mnist)
        image, depth = scene.image.astype(np.float64), scene.depth.astype(np.float64)
        for d in scene.digits:
            core = _isolated_core(scene, d)
            if not core.any():
                continue
            seen[d.kind] += 1
            rgb_gap = np.sqrt(((image[core] - 255 * scene.background_rgb[core]) ** 2).sum(axis=1)) / 255
            plane = scene.background_depth[core]
            if d.kind == "depth_only":  # RGB: the background's rendering, up to noise
                assert np.abs(image[core] - 255 * scene.background_rgb[core]).max() <= noise_255 + 1e-9
            else:
                assert rgb_gap.min() >= contrast > 0.15
            if d.kind == "rgb_only":  # depth: the background plane, up to noise
                assert np.all(np.abs(depth[core] - plane) <= depth_noise_at(plane, RECIPE.depth_noise_m)
                              + float32_eps)
            else:  # raised: nearer by its height (times the coverage), up to noise
                raised = plane - d.height_m
                assert RECIPE.relief_m <= d.height_m <= 2 * RECIPE.relief_m
                assert np.all(np.abs(depth[core] - raised) <= depth_noise_at(raised, RECIPE.depth_noise_m)
                              + (1 - CORE) * d.height_m + float32_eps)
    assert min(seen.values()) >= 5, seen


def test_void_only_on_digit_borders_and_labels_follow_the_nearest_digit(mnist):
    n_void = 0
    for index in range(20):
        scene = render_scene(RECIPE, index, *mnist)
        alphas = np.stack([d.alpha for d in scene.digits])
        border = ((alphas > VOID_LOW) & (alphas < VOID_HIGH)).any(axis=0)
        void = scene.label == 0
        assert np.all(border[void])
        n_void += int(void.sum())
        assert np.all(scene.label[(alphas <= VOID_LOW).all(axis=0)] == 1)  # no digit: background
        nearest = scene.digits[-1]
        core = nearest.alpha >= VOID_HIGH
        assert np.all(scene.label[core] == 2 + nearest.label)
        assert np.all(scene.kind[core] == KINDS.index(nearest.kind)) and np.all(scene.kind[void] == -1)
        assert np.all(scene.label[(nearest.alpha > VOID_LOW) & ~core] == 0)
    assert n_void > 0


def _write_params(tmp_path, **changes) -> str:
    block = {**dataclasses.asdict(RECIPE), **changes}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"rgbd_digits": block}))
    return str(path)


def test_recipe_reads_from_params(tmp_path):
    assert load_blocks(_write_params(tmp_path), {"rgbd_digits": RGBDDigitsRecipe})["rgbd_digits"] == RECIPE


@pytest.mark.parametrize("changes, key, expectation", [
    ({"height": 48}, "rgbd_digits.height", "multiple of 32"),
    ({"width": 16}, "rgbd_digits.width", "multiple of 32"),
    ({"p_both": 0.3}, "rgbd_digits.p_rgb_only", "must sum to 1, got 0.9"),
    ({"digits_min": 3, "digits_max": 2}, "rgbd_digits.digits_min", "must not exceed digits_max"),
    ({"digit_size_min": 0.2}, "rgbd_digits.digit_size_min", "at least 8"),
    ({"relief_m": 0.05}, "rgbd_digits.relief_m", "twice the depth noise"),
    ({"n_scenes": 2.5}, "rgbd_digits.n_scenes", "expected an integer"),
    ({"p_depth": 0.3}, "rgbd_digits.p_depth", "did you mean 'p_depth_only'"),
])
def test_bad_recipe_raises_one_line_naming_the_key(tmp_path, changes, key, expectation):
    with pytest.raises(ParamsError) as info:
        load_blocks(_write_params(tmp_path, **changes), {"rgbd_digits": RGBDDigitsRecipe})
    message = str(info.value)
    assert f": {key}: " in message and expectation in message and "\n" not in message


def test_sample_figure_is_a_deterministic_png(tmp_path, arrays):
    import matplotlib.image

    first = write_sample_figure(arrays["images"], arrays["depths"], arrays["labels"], tmp_path / "a.png")
    second = write_sample_figure(arrays["images"], arrays["depths"], arrays["labels"], tmp_path / "b.png")
    assert first.read_bytes()[:8] == PNG_SIGNATURE and first.read_bytes() == second.read_bytes()
    height, width, _ = matplotlib.image.imread(first).shape
    assert (width, height) == (670, 295)  # 100 dpi: (0.3 + 4 × 1.6) × (3 × 1.6 × 32/64 + 0.55) inches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary file left


def test_nyu_loader_reads_the_build(built, arrays):
    data = load(built[0], num_classes=NUM_CLASSES)
    n, h, w = RECIPE.n_scenes, RECIPE.height, RECIPE.width
    assert data["m1"].shape == (n, 3, h, w) and data["m2"].shape == (n, 1, h, w)
    assert np.array_equal(data["labels"], arrays["labels"].astype(np.int64))
    rgb = np.concatenate(list(data["m1"].blocks()))
    images = arrays["images"].transpose(0, 3, 1, 2).astype(np.float32)
    low, high = images.min(axis=(0, 2, 3), keepdims=True), images.max(axis=(0, 2, 3), keepdims=True)
    assert np.allclose(rgb, (images - low) / (high - low), atol=1e-6)  # per channel over the dataset
    depth = np.concatenate(list(data["m2"].blocks()))[:, 0]
    raw = arrays["depths"]
    low, high = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
    assert np.allclose(depth, (raw - low) / (high - low), atol=1e-6)  # per image


def test_stage_writes_the_folder_and_figure_and_prints_the_summary(tmp_path, monkeypatch, capsys, built):
    from stages import build_rgbd_digits

    out, figure = tmp_path / "data" / "rgbd_digits", tmp_path / "figures" / "samples.png"
    monkeypatch.setattr(sys, "argv", ["build_rgbd_digits", "--params", _write_params(tmp_path), "--out", str(out),
                                      "--figure", str(figure)])
    build_rgbd_digits.main()
    assert json.loads(capsys.readouterr().out) == built[1]
    assert _digest(out) == _digest(built[0]) and figure.read_bytes()[:8] == PNG_SIGNATURE
    assert not (tmp_path / "data" / "rgbd_digits.tmp").exists()
