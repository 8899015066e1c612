"""AV-Digits: built from packages, byte-identical for the same params, readable by the AV-MNIST loader."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest

from pipeline.data.av_digits import (MNIST_5K_SHA256, build_av_digits, load_mnist_5k, mnist_5k_path, pca_degrade,
                                     write_av_digits)
from pipeline.data.av_mnist import load_av_mnist


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.npy"))}


def test_same_params_give_byte_identical_files(tmp_path, tiny_recipe, tiny_av_digits):
    """A second build (other process count) writes the very same bytes as the session's build."""
    again = tmp_path / "again"
    write_av_digits(tiny_recipe, again, workers=1)
    assert _digest(again) == _digest(tiny_av_digits)
    assert len(_digest(again)) == 6


def test_other_seed_gives_other_audio(tiny_recipe, tiny_av_digits):
    other = build_av_digits(dataclasses.replace(tiny_recipe, seed=tiny_recipe.seed + 1), workers=2)
    built = np.concatenate([np.load(tiny_av_digits / "audio" / f"{part}_data.npy") for part in ("train", "test")])
    assert other["audio"].shape == built.shape == (60, 16, 16)
    assert not np.array_equal(other["audio"], built)


def test_layout_is_read_by_the_av_mnist_loader(tiny_av_digits):
    arrays = load_av_mnist(tiny_av_digits, 16)
    assert arrays["m1"].shape == (60, 1, 28, 28) and arrays["m2"].shape == (60, 1, 16, 16)
    assert np.bincount(arrays["labels"], minlength=10).tolist() == [6] * 10
    assert arrays["m1"].dtype == np.float32 and 0.0 <= arrays["m2"].min() and arrays["m2"].max() <= 1.0
    assert np.load(tiny_av_digits / "image" / "train_data.npy").shape[1] == 784


def test_mnist_subset_checksum_is_verified(tmp_path):
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 784) and np.bincount(labels).tolist() == [500] * 10
    tampered = tmp_path / "mnist_5k.csv.gz"
    shutil.copy(mnist_5k_path(), tampered)
    with tampered.open("ab") as handle:
        handle.write(b"x")
    with pytest.raises(ValueError, match=MNIST_5K_SHA256):
        load_mnist_5k(tampered)


def test_pca_degradation_keeps_the_fewest_components_reaching_the_variance():
    rng = np.random.default_rng(0)
    images = (rng.random((200, 784)) * 255).astype(np.uint8)
    degraded, k = pca_degrade(images, 0.25)
    centred = images - images.mean(0)
    singular = np.linalg.svd(centred, compute_uv=False)
    ratio = np.cumsum(singular**2) / np.sum(singular**2)
    assert ratio[k - 1] >= 0.25 and (k == 1 or ratio[k - 2] < 0.25)
    assert degraded.dtype == np.uint8 and degraded.shape == images.shape
    assert not np.array_equal(degraded, images)
