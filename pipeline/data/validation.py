"""Checked reading of raw arrays: every failure names the file and what was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import UserError


class DataError(UserError):
    """Raw data is missing, truncated or malformed. The message names the file and the expectation."""


def load_npy(path: Path, *, shape: tuple[int, ...] | None = None, ndim: int | None = None, hint: str = "") -> np.ndarray:
    """Read a .npy file without unpickling, memory-mapped, and check its shape and finiteness."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; {hint}".rstrip("; "))
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array (truncated or corrupt?): {err}") from err
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise DataError(f"{path}: expected an array of shape {tuple(shape)}, got {tuple(array.shape)}")
    if ndim is not None and array.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}-D array, got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(f"{path}: expected numeric values, got dtype {array.dtype}")
    return array


def per_sample_min_max(array: np.ndarray, path: Path, chunk: int = 4096) -> np.ndarray:
    """(x − min) / (max − min) over each sample's own values, in float32 and in chunks (so a memory-mapped
    float64 file is never copied whole). Non-finite values are an error; a constant sample maps to 0."""
    out = np.empty(array.shape, dtype=np.float32)
    for start in range(0, len(array), chunk):
        block = np.asarray(array[start:start + chunk], dtype=np.float32)
        flat = block.reshape(len(block), -1)
        finite = np.isfinite(flat).all(axis=1)
        if not finite.all():
            first = start + int(np.flatnonzero(~finite)[0])
            raise DataError(f"{path}: sample {first} contains NaN or infinite values; expected finite numbers")
        low = flat.min(axis=1, keepdims=True)
        span = flat.max(axis=1, keepdims=True) - low
        out[start:start + len(block)] = ((flat - low) / np.where(span > 0, span, 1.0)).reshape(block.shape)
    return out
