"""The AV-MNIST file layout (MultiBench `avmnist/`) and its loader, as the authors use it.

Layout under the dataset root:
    image/train_data.npy  (N_train, 784)     image/test_data.npy  (N_test, 784)     0..255 scale
    audio/train_data.npy  (N_train, S, S)    audio/test_data.npy  (N_test, S, S)    0..255 scale
    train_labels.npy      (N_train,)         test_labels.npy      (N_test,)         0..9

The loader concatenates train and test (the official split is discarded; quirk Q15) and min-max
normalises each sample over its own values (the authors' rule for rank-2 and rank-3 arrays; Q14).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.validation import DataError, load_npy, per_sample_min_max

IMAGE_FILES = ("image/train_data.npy", "image/test_data.npy")
AUDIO_FILES = ("audio/train_data.npy", "audio/test_data.npy")
LABEL_FILES = ("train_labels.npy", "test_labels.npy")
NUM_CLASSES = 10


def write_av_mnist_layout(root: Path, images: np.ndarray, audio: np.ndarray, labels: np.ndarray,
                          n_train: int) -> None:
    """Write arrays in the AV-MNIST layout, the first `n_train` samples as the "train" files."""
    root = Path(root)
    for sub in ("image", "audio"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for names, array in ((IMAGE_FILES, images), (AUDIO_FILES, audio), (LABEL_FILES, labels)):
        np.save(root / names[0], array[:n_train], allow_pickle=False)
        np.save(root / names[1], array[n_train:], allow_pickle=False)


def load_av_mnist(root: Path, spectrogram_size: int) -> dict[str, np.ndarray]:
    """Load an AV-MNIST-layout dataset: image (N,1,28,28) and audio (N,1,S,S) float32 in [0,1] after
    per-sample min-max, labels (N,) int64. Every file is checked for shape, finiteness and labels."""
    root = Path(root)
    hint = (f"expected the AV-MNIST layout under {root}/: {', '.join(IMAGE_FILES + AUDIO_FILES + LABEL_FILES)} "
            "(MultiBench's avmnist archive, or the AV-Digits build)")
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; {hint}")
    parts: dict[str, list[np.ndarray]] = {"image": [], "audio": [], "labels": []}
    for split in (0, 1):
        labels = load_npy(root / LABEL_FILES[split], ndim=1, hint=hint)
        n = len(labels)
        image = load_npy(root / IMAGE_FILES[split], shape=(n, 784), hint=hint)
        audio = load_npy(root / AUDIO_FILES[split], shape=(n, spectrogram_size, spectrogram_size), hint=hint)
        parts["labels"].append(_check_labels(labels, root / LABEL_FILES[split]))
        parts["image"].append(per_sample_min_max(image, root / IMAGE_FILES[split]))
        parts["audio"].append(per_sample_min_max(audio, root / AUDIO_FILES[split]))
    return {"m1": np.concatenate(parts["image"]).reshape(-1, 1, 28, 28),
            "m2": np.concatenate(parts["audio"]).reshape(-1, 1, spectrogram_size, spectrogram_size),
            "labels": np.concatenate(parts["labels"])}


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path}: labels must be whole numbers 0..{NUM_CLASSES - 1}")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{path}: label {labels[bad[0]]!r} at position {bad[0]} is out of range; "
                        f"expected 0..{NUM_CLASSES - 1} ({bad.size} bad labels in all)")
    return labels.astype(np.int64)
