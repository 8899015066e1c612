"""Shared fixtures: a tiny AV-Digits build and small in-memory datasets made by the tests themselves."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
warnings.filterwarnings("ignore", message=".*noload.*")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_recipe():
    from pipeline.data.av_digits import AVDigitsRecipe

    return AVDigitsRecipe(samples_per_class=6, pca_variance_kept=0.25, snr_db_min=-6.0, snr_db_max=6.0,
                          spectrogram_size=16, babble_fraction=0.5, seed=3)


@pytest.fixture(scope="session")
def tiny_av_digits(tmp_path_factory, tiny_recipe) -> Path:
    """A 60-sample AV-Digits build in the AV-MNIST layout (built once per test session)."""
    from pipeline.data.av_digits import write_av_digits

    root = tmp_path_factory.mktemp("av_digits")
    write_av_digits(tiny_recipe, root, workers=2)
    return root


def synthetic_dataset(n: int = 96, size: int = 16, seed: int = 0, device: str = "cpu"):
    """A learnable two-modality dataset: class-dependent blobs in both modalities, plus noise."""
    from pipeline.data.tensors import DeviceDataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    m1 = rng.normal(0, 0.3, (n, 1, 28, 28)).astype(np.float32)
    m2 = rng.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    for i, c in enumerate(labels):
        m1[i, 0, 2 * c:2 * c + 6, 4:20] += 1.0
        m2[i, 0, c % size, :] += 1.0
    return DeviceDataset.from_arrays({"m1": m1, "m2": m2, "labels": labels.astype(np.int64)}, torch.device(device))


def synthetic_split(n: int = 96) -> dict[str, torch.Tensor]:
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    a, b = int(0.6 * n), int(0.8 * n)
    return {"train": index[:a], "val": index[a:b], "test": index[b:]}
