"""NYU-Depth-V2 raw files: the official layout as h5py/scipy see it, the merge into the authors' file, the loader's
normalisation against a hand NumPy version of the authors' recipe, block streaming, and one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from pipeline.data.chunked import ChunkedArray
from pipeline.data.nyu_depth_v2 import (LABELED_FILE, LABELS40_FILE, MERGED_FILE, load, merge_official,
                                        write_official_layout)
from pipeline.data.validation import DataError

N, H, W = 5, 32, 64


def _arrays(n: int = N, height: int = H, width: int = W, seed: int = 0):
    """Natural-orientation arrays with known extremes: red spans 3..250, green is constant 7 (→ 0), blue spans
    10..60; depth image 3 is constant (→ 0)."""
    rs = np.random.RandomState(seed)
    images = np.empty((n, height, width, 3), dtype=np.uint8)
    images[..., 0] = rs.randint(3, 251, size=(n, height, width))
    images[0, 0, 0, 0], images[1, 2, 3, 0] = 3, 250
    images[..., 1] = 7
    images[..., 2] = rs.randint(10, 61, size=(n, height, width))
    images[2, 0, 0, 2], images[1, 1, 1, 2], images[3, 5, 6, 2] = 10, 60, 35
    depths = rs.uniform(0.5, 9.5, size=(n, height, width)).astype(np.float32)
    depths[3] = 2.25
    labels = rs.randint(0, 41, size=(n, height, width))
    return images, depths, labels


def _chunks(array: ChunkedArray) -> np.ndarray:
    return np.concatenate(list(array.blocks()))


def _authors(images: np.ndarray, depths: np.ndarray, labels: np.ndarray):
    """The authors' recipe on the official orientation (N,3,W,H) / (N,W,H), in float64: RGB min-max per channel
    over (N,W,H), depth min-max per image, then transposed to H×W; constant ones give 0 here."""
    rgb = images.transpose(0, 3, 2, 1).astype(np.float64)
    low, high = rgb.min(axis=(0, 2, 3), keepdims=True), rgb.max(axis=(0, 2, 3), keepdims=True)
    rgb = (rgb - low) / np.where(high > low, high - low, 1)
    depth = depths.transpose(0, 2, 1).astype(np.float64)
    low, high = depth.min(axis=(1, 2), keepdims=True), depth.max(axis=(1, 2), keepdims=True)
    depth = (depth - low) / np.where(high > low, high - low, 1)
    return rgb.transpose(0, 1, 3, 2), depth.transpose(0, 2, 1)[:, None], labels.astype(np.int64)


def test_official_layout_is_what_h5py_and_scipy_see(tmp_path):
    images, depths, labels = _arrays()
    write_official_layout(tmp_path, images, depths, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LABELED_FILE, LABELS40_FILE])
    raw = (tmp_path / LABELED_FILE).read_bytes()
    assert raw.startswith(b"MATLAB 7.3 MAT-file") and raw[124:128] == b"\x00\x02IM"
    assert raw[512:520] == b"\x89HDF\r\n\x1a\n"   # the HDF5 superblock right after the 512-byte user block
    with h5py.File(tmp_path / LABELED_FILE, "r") as handle:
        assert handle.userblock_size == 512
        assert (handle["images"].shape, handle["images"].dtype) == ((5, 3, 64, 32), np.uint8)
        assert (handle["depths"].shape, handle["depths"].dtype) == ((5, 64, 32), np.float32)
        assert handle["labels"].shape == (5, 64, 32)
        assert handle["images"][1, 0, 3, 2] == 250 and handle["depths"][3, 10, 20] == np.float32(2.25)
        np.testing.assert_array_equal(handle["labels"][2], labels[2].T)
    labels40 = scipy.io.loadmat(tmp_path / LABELS40_FILE)["labels40"]
    assert labels40.shape == (32, 64, 5) and labels40.dtype == np.uint8
    np.testing.assert_array_equal(labels40[:, :, 4], labels[4])


def test_load_follows_the_authors_recipe(tmp_path):
    images, depths, labels = _arrays()
    write_official_layout(tmp_path, images, depths, labels)
    data = load(tmp_path)
    assert data["summary"] == {"source": "official", "height": 32, "width": 64,
                               "rgb_min": [3, 7, 10], "rgb_max": [250, 7, 60]}
    m1, m2 = _chunks(data["m1"]), _chunks(data["m2"])
    assert data["m1"].shape == m1.shape == (5, 3, 32, 64) and m1.dtype == np.float32
    assert data["m2"].shape == m2.shape == (5, 1, 32, 64) and m2.dtype == np.float32
    assert data["labels"].shape == (5, 32, 64) and data["labels"].dtype == np.int64
    # Hand values: blue 35 in 10..60 is 0.5; red 250 is 1; constant green and constant depth image 3 are 0.
    assert m1[3, 2, 5, 6] == 0.5 and m1[1, 0, 2, 3] == 1.0 and m1[0, 0, 0, 0] == 0.0
    assert not m1[:, 1].any() and not m2[3].any()
    for i in (0, 1, 2, 4):
        assert m2[i].min() == 0.0 and m2[i].max() == 1.0
    rgb, depth, int_labels = _authors(images, depths, labels)
    # float32 (x − min) / span of exact integers is correctly rounded, so it equals float64 cast to float32.
    np.testing.assert_array_equal(m1, rgb.astype(np.float32))
    np.testing.assert_allclose(m2, depth, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(data["labels"], int_labels)


def test_merge_then_load_gives_identical_arrays(tmp_path):
    official, merged = tmp_path / "official", tmp_path / "merged"
    write_official_layout(official, *_arrays())
    out = merge_official(official / LABELED_FILE, official / LABELS40_FILE, merged / MERGED_FILE)
    assert out == merged / MERGED_FILE and [p.name for p in merged.iterdir()] == [MERGED_FILE]
    with h5py.File(out, "r") as handle:
        assert {k: handle[k].shape for k in handle} == {"images": (5, 3, 64, 32), "depths": (5, 64, 32),
                                                        "labels40": (5, 64, 32)}
        assert handle["images"].dtype == np.uint8
    assert out.read_bytes().startswith(b"MATLAB 7.3 MAT-file")
    first, second = load(official), load(merged)
    assert second["summary"] == {**first["summary"], "source": "merged"}
    np.testing.assert_array_equal(_chunks(first["m1"]), _chunks(second["m1"]))
    np.testing.assert_array_equal(_chunks(first["m2"]), _chunks(second["m2"]))
    np.testing.assert_array_equal(first["labels"], second["labels"])
    shutil.copy(out, official / MERGED_FILE)   # the merged file wins when both layouts are present
    assert load(official)["summary"]["source"] == "merged"


def test_blocks_of_two_equal_one_block(tmp_path):
    write_official_layout(tmp_path, *_arrays())
    small, large = load(tmp_path, block=2), load(tmp_path, block=64)
    assert [len(b) for b in small["m1"].blocks()] == [2, 2, 1]
    assert [len(b) for b in small["m2"].blocks()] == [2, 2, 1]
    assert small["summary"] == large["summary"]
    np.testing.assert_array_equal(_chunks(small["m1"]), _chunks(large["m1"]))
    np.testing.assert_array_equal(_chunks(small["m2"]), _chunks(large["m2"]))
    np.testing.assert_array_equal(small["labels"], large["labels"])


def _drop_depths(root: Path) -> None:
    with h5py.File(root / LABELED_FILE, "r+") as handle:
        del handle["depths"]


def _other_n(root: Path) -> None:
    write_official_layout(root / "four", *_arrays(n=4))
    shutil.copy(root / "four" / LABELS40_FILE, root / LABELS40_FILE)


def _label_41(root: Path) -> None:
    images, depths, labels = _arrays()
    labels[4, 31, 63] = 41
    write_official_layout(root, images, depths, labels)


def _nan_depth(root: Path) -> None:
    images, depths, labels = _arrays()
    depths[2, 3, 4] = np.nan
    write_official_layout(root, images, depths, labels)


def _truncate(root: Path) -> None:
    data = (root / LABELED_FILE).read_bytes()
    (root / LABELED_FILE).write_bytes(data[:len(data) // 2])


BAD = {
    "missing labels40.mat": (lambda root: (root / LABELS40_FILE).unlink(), LABELS40_FILE, "file not found"),
    "empty folder": (lambda root: [p.unlink() for p in root.iterdir()], "no NYU-Depth-V2 files", MERGED_FILE),
    "no depths": (_drop_depths, LABELED_FILE, "dataset 'depths' missing"),
    "N mismatch": (_other_n, LABELS40_FILE, "expected (H,W,N) = (32, 64, 5)"),
    "label 41": (_label_41, LABELS40_FILE, "expected 0..40"),
    "H = 48": (lambda root: write_official_layout(root, *_arrays(height=48)), LABELED_FILE, "multiples of 32"),
    "not HDF5": (lambda root: (root / LABELED_FILE).write_bytes(b"not a mat file" * 100), LABELED_FILE,
                 "not a readable HDF5"),
    "truncated": (_truncate, LABELED_FILE, "not a readable HDF5"),
    "non-finite depth": (_nan_depth, LABELED_FILE, "image 2 contain NaN"),
    "v7.3 labels40.mat": (lambda root: shutil.copy(root / LABELED_FILE, root / LABELS40_FILE), LABELS40_FILE,
                          "expected labels40.mat in MATLAB v5 format"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_file_and_expectation(tmp_path, case):
    spoil, names, expects = BAD[case]
    write_official_layout(tmp_path, *_arrays())
    spoil(tmp_path)
    with pytest.raises(DataError) as info:
        load(tmp_path)
    message = str(info.value)
    assert "\n" not in message and names in message and expects in message


def test_num_classes_bounds_the_labels(tmp_path):
    _label_41(tmp_path)
    assert load(tmp_path, num_classes=42)["labels"][4, 31, 63] == 41


def test_merge_checks_before_writing(tmp_path):
    write_official_layout(tmp_path, *_arrays())
    _other_n(tmp_path)
    with pytest.raises(DataError, match="expected \\(H,W,N\\)"):
        merge_official(tmp_path / LABELED_FILE, tmp_path / LABELS40_FILE, tmp_path / "out" / MERGED_FILE)
    assert not (tmp_path / "out").exists()
