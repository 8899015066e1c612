"""NYU-Depth-V2 (RGB-D, 40-class segmentation + void): the official labeled file plus Gupta et al.'s labels40.mat,
their merge into the authors' `NYU-Depth-V2_data.mat`, and the loader with the authors' normalisation.

Seen through h5py a MATLAB v7.3 file is transposed: `images` (N,3,W,H) uint8, `depths` (N,W,H) float32 metres.
labels40.mat is MATLAB v5 (scipy), (H,W,N). The real set is 1449 × 480 × 640 (2.8 GB on disk, ~7 GB as float32),
so everything is read in blocks of images and the float32 modalities are handed out as ChunkedArrays.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.data.chunked import ChunkedArray
from pipeline.data.validation import DataError

LABELED_FILE = "nyu_depth_v2_labeled.mat"
LABELS40_FILE = "labels40.mat"
MERGED_FILE = "NYU-Depth-V2_data.mat"
NUM_CLASSES = 41          # 40 classes + 0 = void
MULTIPLE = 32             # FuseNet pools 2×2 five times
BLOCK = 64                # 64 images of float32 RGB are 236 MB

LAYOUT = (f"either the official {LABELED_FILE} (MATLAB v7.3: images (N,3,W,H) uint8, depths (N,W,H) metres) plus "
          f"Gupta et al.'s {LABELS40_FILE} (MATLAB v5: labels40 (H,W,N), 0..40), or the authors' merged "
          f"{MERGED_FILE} (HDF5: images, depths, labels40 (N,W,H))")

_V73_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: pipeline.data.nyu_depth_v2 HDF5 schema 1.00 ."
_V5_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: pipeline.data.nyu_depth_v2"


def write_official_layout(folder: Path, images: np.ndarray, depths: np.ndarray, labels40: np.ndarray) -> None:
    """Write `folder/nyu_depth_v2_labeled.mat` (HDF5 with a 512-byte MATLAB 7.3 user block; images (N,3,W,H)
    uint8, depths (N,W,H) float32, labels (N,W,H) uint16 holding labels40 as a stand-in for the 894 raw classes)
    and `folder/labels40.mat` (MATLAB v5, labels40 (H,W,N)) from natural-orientation arrays: images (N,H,W,3)
    uint8, depths (N,H,W) metres, labels40 (N,H,W) integers."""
    import scipy.io   # imported here: every stage imports this module, few read .mat files

    images, depths, labels40 = np.asarray(images), np.asarray(depths), np.asarray(labels40)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: expected (N,H,W,3) uint8, got {images.shape} {images.dtype}")
    if depths.shape != images.shape[:3] or labels40.shape != images.shape[:3]:
        raise ValueError(f"depths {depths.shape} and labels40 {labels40.shape}: expected {images.shape[:3]}")
    if labels40.size and (labels40.min() < 0 or labels40.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"labels40: expected integers 0..65535, got {labels40.min()}..{labels40.max()}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    as_hdf5 = {"images": images.transpose(0, 3, 2, 1), "depths": depths.astype(np.float32).transpose(0, 2, 1),
               "labels": labels40.astype(np.uint16).transpose(0, 2, 1)}
    _write_hdf5(folder / LABELED_FILE, {k: (v.shape, v.dtype) for k, v in as_hdf5.items()},
                lambda name, start, stop: as_hdf5[name][start:stop], len(images), BLOCK)
    small = labels40.astype(np.uint8 if labels40.size == 0 or labels40.max() < 256 else np.uint16)
    tmp = folder / f".{LABELS40_FILE}.tmp"
    with open(tmp, "wb") as handle:
        scipy.io.savemat(handle, {"labels40": small.transpose(1, 2, 0)}, do_compression=True)
    _stamp(tmp, _V5_HEADER, 116)   # scipy writes the clock time here; a fixed text keeps the bytes reproducible
    os.replace(tmp, folder / LABELS40_FILE)


def merge_official(labeled_mat: Path, labels40_mat: Path, out: Path) -> Path:
    """Write the authors' merged HDF5 `out` (images and depths copied from the official file, labels40 turned
    from (H,W,N) to (N,W,H)), block by block, after checking both inputs; returns `out`."""
    labeled_mat, out = Path(labeled_mat), Path(out)
    with _open_hdf5(labeled_mat) as source:
        n, height, width = _check_hdf5(source, labeled_mat, ("images", "depths"))
        labels = _read_labels40(Path(labels40_mat), n, height, width)
        arrays = {"images": source["images"], "depths": source["depths"], "labels40": None}
        specs = {"images": (arrays["images"].shape, arrays["images"].dtype),
                 "depths": (arrays["depths"].shape, arrays["depths"].dtype),
                 "labels40": ((n, width, height), labels.dtype)}

        def read(name: str, start: int, stop: int) -> np.ndarray:
            if name == "labels40":
                return labels[:, :, start:stop].transpose(2, 1, 0)
            return arrays[name][start:stop]

        _write_hdf5(out, specs, read, n, BLOCK)
    return out


def load(root: Path, num_classes: int = NUM_CLASSES, block: int = BLOCK) -> dict[str, Any]:
    """The NYU-Depth-V2 arrays of `root` (merged file preferred, else the official pair), checked and normalised
    as the authors do (spec §2.6, Q13, Q14): m1 = RGB ChunkedArray (N,3,H,W) float32 min-max per channel over the
    whole dataset, m2 = depth ChunkedArray (N,1,H,W) float32 min-max per image, labels (N,H,W) int64, summary."""
    root = Path(root)
    if (root / MERGED_FILE).is_file():
        source, path = "merged", root / MERGED_FILE
    elif (root / LABELED_FILE).is_file() or (root / LABELS40_FILE).is_file():
        source, path = "official", root / LABELED_FILE
        for name in (LABELED_FILE, LABELS40_FILE):
            if not (root / name).is_file():
                raise DataError(f"{root / name}: file not found; expected in {root}/ {LAYOUT}")
    else:
        raise DataError(f"{root}: no NYU-Depth-V2 files found; expected {LAYOUT}")
    if block < 1:
        raise DataError(f"{root}: block = {block}; expected a positive number of images per block")

    with _open_hdf5(path) as handle:
        names = ("images", "depths", "labels40") if source == "merged" else ("images", "depths")
        n, height, width = _check_hdf5(handle, path, names)
        if source == "merged":
            labels = _labels_int64(handle["labels40"], (0, 2, 1), path, num_classes, block)
        else:
            raw = _read_labels40(root / LABELS40_FILE, n, height, width)
            labels = _labels_int64(raw, (2, 0, 1), root / LABELS40_FILE, num_classes, block)
        rgb_min, rgb_max = np.full(3, np.inf), np.full(3, -np.inf)
        depth_min, depth_max = np.empty(n, np.float32), np.empty(n, np.float32)
        for start in range(0, n, block):
            images = handle["images"][start:start + block]
            rgb_min = np.minimum(rgb_min, images.min(axis=(0, 2, 3)))
            rgb_max = np.maximum(rgb_max, images.max(axis=(0, 2, 3)))
            depths = handle["depths"][start:start + block].astype(np.float32)
            flat = depths.reshape(len(depths), -1)
            finite = np.isfinite(flat).all(axis=1)
            if not finite.all():
                first = start + int(np.flatnonzero(~finite)[0])
                raise DataError(f"{path}: depths of image {first} contain NaN or infinite values; "
                                f"expected finite metres")
            depth_min[start:start + len(depths)] = flat.min(axis=1)
            depth_max[start:start + len(depths)] = flat.max(axis=1)

    # A constant channel or image has max == min; the authors would divide by zero (NaN), we map it to 0.
    rgb_low = rgb_min.astype(np.float32).reshape(1, 3, 1, 1)
    rgb_span = np.where(rgb_max > rgb_min, rgb_max - rgb_min, 1).astype(np.float32).reshape(1, 3, 1, 1)
    depth_span = np.where(depth_max > depth_min, depth_max - depth_min, np.float32(1)).astype(np.float32)

    def rgb_blocks() -> Iterator[np.ndarray]:
        with _open_hdf5(path) as handle:
            for start in range(0, n, block):
                images = handle["images"][start:start + block].astype(np.float32)
                yield np.ascontiguousarray(((images - rgb_low) / rgb_span).transpose(0, 1, 3, 2))

    def depth_blocks() -> Iterator[np.ndarray]:
        with _open_hdf5(path) as handle:
            for start in range(0, n, block):
                depths = handle["depths"][start:start + block].astype(np.float32)
                low = depth_min[start:start + len(depths), None, None]
                span = depth_span[start:start + len(depths), None, None]
                yield np.ascontiguousarray(((depths - low) / span).transpose(0, 2, 1)[:, None])

    summary = {"source": source, "height": height, "width": width,
               "rgb_min": [int(v) for v in rgb_min], "rgb_max": [int(v) for v in rgb_max]}
    return {"m1": ChunkedArray(shape=(n, 3, height, width), blocks=rgb_blocks),
            "m2": ChunkedArray(shape=(n, 1, height, width), blocks=depth_blocks),
            "labels": labels, "summary": summary}


def _open_hdf5(path: Path) -> h5py.File:
    """Open `path` read-only as HDF5, or say in one line why it is not one."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {LAYOUT}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 / MATLAB v7.3 file (truncated or another format?): "
                        f"{str(err).splitlines()[0]}") from err


def _check_hdf5(handle: h5py.File, path: Path, names: tuple[str, ...]) -> tuple[int, int, int]:
    """Check the datasets `names` of an official or merged file; return (N, H, W)."""
    for name in names:
        if not isinstance(handle.get(name), h5py.Dataset):
            raise DataError(f"{path}: dataset '{name}' missing; expected {', '.join(names)}")
    images = handle["images"]
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: images is {images.shape} {images.dtype}; expected (N,3,W,H) uint8")
    n, _, width, height = images.shape
    if n == 0:
        raise DataError(f"{path}: images holds no image; expected N >= 1")
    for name in names[1:]:
        if handle[name].shape != (n, width, height):
            raise DataError(f"{path}: {name} is {handle[name].shape}; expected (N,W,H) = {(n, width, height)}")
    if not np.issubdtype(handle["depths"].dtype, np.floating):
        raise DataError(f"{path}: depths has dtype {handle['depths'].dtype}; expected floating-point metres")
    if height % MULTIPLE or width % MULTIPLE:
        raise DataError(f"{path}: images are {height}×{width} (H×W); expected H and W multiples of {MULTIPLE} "
                        f"(FuseNet pools five times)")
    return n, height, width


def _read_labels40(path: Path, n: int, height: int, width: int) -> np.ndarray:
    """labels40 (H,W,N) of Gupta et al.'s MATLAB v5 file, checked against the labeled file's N, H and W."""
    import scipy.io   # imported here: every stage imports this module, few read .mat files

    if not path.is_file():
        raise DataError(f"{path}: file not found; expected {LAYOUT}")
    if h5py.is_hdf5(path):
        raise DataError(f"{path}: a MATLAB v7.3 (HDF5) file; expected {LABELS40_FILE} in MATLAB v5 format")
    try:
        content = scipy.io.loadmat(path, variable_names=["labels40"])
    except Exception as err:   # scipy raises ValueError, MatReadError, zlib errors... for a bad file
        raise DataError(f"{path}: not a readable MATLAB v5 file (truncated or another format?): {err}") from err
    if "labels40" not in content:
        raise DataError(f"{path}: variable 'labels40' missing; expected labels40 (H,W,N)")
    labels = content["labels40"]
    if labels.shape != (height, width, n):
        raise DataError(f"{path}: labels40 is {labels.shape}; expected (H,W,N) = {(height, width, n)} as the "
                        f"images of {LABELED_FILE}")
    return labels


def _labels_int64(labels: Any, axes: tuple[int, int, int], path: Path, num_classes: int, block: int) -> np.ndarray:
    """labels (in memory or an HDF5 dataset) transposed by `axes` to (N,H,W) int64, block by block, after
    checking that every value is an integer in 0..num_classes-1. The sample axis is `axes[0]`."""
    shape = tuple(labels.shape[a] for a in axes)
    out = np.empty(shape, dtype=np.int64)
    for start in range(0, shape[0], block):
        index = [slice(None)] * 3
        index[axes[0]] = slice(start, start + block)
        part = np.asarray(labels[tuple(index)]).transpose(axes)
        if np.issubdtype(part.dtype, np.floating) and not np.array_equal(part, np.round(part)):
            raise DataError(f"{path}: labels40 holds non-integer values; expected class ids 0..{num_classes - 1}")
        if part.min() < 0 or part.max() >= num_classes:
            raise DataError(f"{path}: labels40 values {part.min():g}..{part.max():g} in images {start}.."
                            f"{start + len(part) - 1}; expected 0..{num_classes - 1} (num_classes = {num_classes})")
        out[start:start + len(part)] = part
    return out


def _write_hdf5(out: Path, specs: dict[str, tuple], read: Callable[[str, int, int], np.ndarray], n: int,
                block: int) -> None:
    """Create HDF5 `out` (via a temporary name) with one dataset per spec (shape, dtype), chunked per image,
    filled from read(name, start, stop) block by block, behind a 512-byte MATLAB 7.3 user block."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with h5py.File(tmp, "w", userblock_size=512) as handle:
        for name, (shape, dtype) in specs.items():
            dataset = handle.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
                                            track_times=False)
            for start in range(0, n, block):
                dataset[start:start + block] = read(name, start, min(start + block, n))
    _stamp(tmp, _V73_HEADER, 116)
    with open(tmp, "r+b") as handle:   # MATLAB's header: 116 text bytes, 8 subsystem bytes, version 0x0200, 'IM'
        handle.seek(116)
        handle.write(b"\0" * 8 + b"\x00\x02IM")
    os.replace(tmp, out)


def _stamp(path: Path, text: bytes, size: int) -> None:
    """Overwrite the first `size` bytes of `path` with `text` padded with spaces (a MAT-file's header text)."""
    with open(path, "r+b") as handle:
        handle.write(text.ljust(size, b" "))
