"""The RAVDESS speech layout the authors' loader reads (their `RAVDESS_preprocessed_npy/`, which is also what
the ravdess extraction writes) and its loader, with the authors' normalisation.

Video is 15 face crops per clip, 224×224, in OpenCV's BGR channel order (the authors' quirk, kept), uint8 on
disk: 1440 clips are 3.25 GB, 13 GB as float32. The loader therefore never builds the float32 array: it
memory-maps the file, finds the per-channel min and max over (N, T, H, W) in one pass and hands the prepare
stage a ChunkedArray whose blocks are normalised on the fly (the authors' rank-5 rule, Q14; their float64
version needs ~26 GB). Audio is 15 MFCCs × 156 frames per clip, min-max normalised per sample (rank-3 rule).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.chunked import ChunkedArray
from pipeline.data.validation import DataError, load_npy, per_sample_min_max

VIDEO_FILE = "video_data.npy"
AUDIO_FILE = "audio_data.npy"
LABEL_FILE = "label_data.npy"
ACTOR_FILE = "actor_data.npy"        # our addition: actor ids 1..24, for actor-disjoint splits
CLIPS_FILE = "clips.txt"             # our addition: one clip stem per line, the sample order
EXTRACTION_FILE = "extraction.json"  # written by the extraction stage (read here with json, not imported)

FRAMES = 15
FACE_SIZE = 224
MFCC_BINS = 15
MFCC_STEPS = 156
EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")   # label = code − 1
NUM_CLASSES = len(EMOTIONS)
VIDEO_SHAPE = (FRAMES, 3, FACE_SIZE, FACE_SIZE)
AUDIO_SHAPE = (MFCC_BINS, MFCC_STEPS)
CLIPS_PER_BLOCK = 64                 # 64 clips of float32 video are 578 MB

LAYOUT = (f"{VIDEO_FILE} (N,15,3,224,224) uint8 face crops in BGR order (224: the authors'; the extraction's "
          f"face_size switch may write another square size), {AUDIO_FILE} (N,15,156) float32 MFCCs, "
          f"{LABEL_FILE} (N,) int64 emotions 0..7 (the authors' RAVDESS_preprocessed_npy/ folder, or the ravdess "
          f"extraction's output, which adds {ACTOR_FILE} (N,) actor ids, {CLIPS_FILE} and {EXTRACTION_FILE})")


def load(root: Path, clips_per_block: int = CLIPS_PER_BLOCK) -> dict[str, Any]:
    """The RAVDESS arrays of `root`, checked and normalised as the authors do: m1 = video as a ChunkedArray
    (N,15,3,224,224) of float32 blocks min-max normalised per channel over the whole dataset, m2 = audio
    (N,15,156) float32 min-max normalised per sample, labels (N,) int64 0..7, groups (N,) int64 actor ids when
    actor_data.npy exists, and a summary (clip count, channel statistics, the extraction's summary if any)."""

    root = Path(root)
    hint = f"expected the RAVDESS layout under {root}/: {LAYOUT}"
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; {hint}")
    labels = _check_labels(load_npy(root / LABEL_FILE, ndim=1, hint=hint), root / LABEL_FILE)
    n = len(labels)
    if n == 0:
        raise DataError(f"{root / LABEL_FILE}: no clips; {hint}")
    video = _load_counted(root / VIDEO_FILE, None, n, hint)
    if video.ndim != 5 or video.shape[1:3] != (FRAMES, 3) or video.shape[3] != video.shape[4]:
        raise DataError(f"{root / VIDEO_FILE}: expected shape (N, 15, 3, S, S) (S = 224 as the authors), got "
                        f"{video.shape}; {hint}")
    audio = _load_counted(root / AUDIO_FILE, AUDIO_SHAPE, n, hint)
    if not (video.dtype == np.uint8 or np.issubdtype(video.dtype, np.floating)):
        raise DataError(f"{root / VIDEO_FILE}: expected uint8 (or float) pixels, got dtype {video.dtype}")
    low, high = channel_min_max(video, root / VIDEO_FILE, clips_per_block)
    result: dict[str, Any] = {
        "m1": ChunkedArray(video.shape, lambda: normalised_blocks(video, low, high, clips_per_block)),
        "m2": per_sample_min_max(audio, root / AUDIO_FILE),
        "labels": labels,
    }
    groups = _load_groups(root, n, hint)
    if groups is not None:
        result["groups"] = groups
    _check_clip_list(root / CLIPS_FILE, n)
    result["summary"] = _summary(root, n, groups is not None, low, high)
    return result


def channel_min_max(video: np.ndarray, path: Path, clips_per_block: int = CLIPS_PER_BLOCK
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel minimum and maximum of a (N,T,C,H,W) array over (N,T,H,W), read in blocks of clips (the
    first of the two passes over the memory-mapped file); non-finite values are an error naming the clip."""
    channels = video.shape[2]
    low = np.full(channels, np.inf)
    high = np.full(channels, -np.inf)
    for start in range(0, len(video), clips_per_block):
        block = np.asarray(video[start:start + clips_per_block])
        if block.dtype != np.uint8:
            finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            if not finite.all():
                first = start + int(np.flatnonzero(~finite)[0])
                raise DataError(f"{path}: clip {first} contains NaN or infinite values; expected finite pixels")
        low = np.minimum(low, block.min(axis=(0, 1, 3, 4)))
        high = np.maximum(high, block.max(axis=(0, 1, 3, 4)))
    return low, high


def normalised_blocks(video: np.ndarray, low: np.ndarray, high: np.ndarray,
                      clips_per_block: int = CLIPS_PER_BLOCK) -> Iterator[np.ndarray]:
    """(x − min_c) / (max_c − min_c) in float32, `clips_per_block` clips at a time (the second pass); a constant
    channel maps to 0, as in per_sample_min_max."""
    shape = (1, 1, len(low), 1, 1)
    offset = low.astype(np.float32).reshape(shape)
    span = (high - low).astype(np.float32)
    scale = np.where(span > 0, span, 1.0).astype(np.float32).reshape(shape)
    for start in range(0, len(video), clips_per_block):
        block = np.asarray(video[start:start + clips_per_block], dtype=np.float32)
        yield (block - offset) / scale


def _load_counted(path: Path, sample_shape: tuple[int, ...] | None, n: int, hint: str) -> np.ndarray:
    """A memory-mapped array of `sample_shape` samples (any shape when None) whose count must equal the
    labels'."""
    array = load_npy(path, ndim=None if sample_shape is None else 1 + len(sample_shape), hint=hint)
    if sample_shape is not None and tuple(array.shape[1:]) != sample_shape:
        raise DataError(f"{path}: expected samples of shape {sample_shape}, got {tuple(array.shape[1:])}")
    if len(array) != n:
        raise DataError(f"{path}: {len(array)} clips but {path.with_name(LABEL_FILE)} has {n} labels; "
                        "expected one entry per clip in every file")
    return array


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path}: labels must be whole numbers 0..{NUM_CLASSES - 1}")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{path}: label {labels[bad[0]].item()!r} at position {bad[0]} is outside the 8 emotions; "
                        f"expected 0..{NUM_CLASSES - 1} ({bad.size} bad labels in all)")
    return labels.astype(np.int64)


def _load_groups(root: Path, n: int, hint: str) -> np.ndarray | None:
    """Actor ids from actor_data.npy (absent in the authors' own folder: then None)."""
    path = root / ACTOR_FILE
    if not path.is_file():
        return None
    actors = load_npy(path, ndim=1, hint=hint)
    if len(actors) != n:
        raise DataError(f"{path}: {len(actors)} actor ids but {root / LABEL_FILE} has {n} labels")
    if not np.issubdtype(actors.dtype, np.integer) or (n and actors.min() < 1):
        raise DataError(f"{path}: expected integer actor ids ≥ 1, got dtype {actors.dtype}")
    return np.asarray(actors, dtype=np.int64)


def _check_clip_list(path: Path, n: int) -> None:
    """clips.txt, when present, must list exactly one clip per sample (it records the sample order)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if len(lines) != n:
            raise DataError(f"{path}: {len(lines)} clip names but {n} samples; expected one line per clip")


def _summary(root: Path, n: int, has_groups: bool, low: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    summary: dict[str, Any] = {"n_clips": n, "groups": has_groups,
                               "video_channel_order": "BGR",
                               "video_channel_min": low.tolist(), "video_channel_max": high.tolist()}
    extraction = root / EXTRACTION_FILE
    if extraction.is_file():
        try:
            summary["extraction"] = json.loads(extraction.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{extraction}: not valid JSON ({err}); expected the extraction's summary") from None
    return summary
