"""Device choice and seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pipeline.params import ParamsError


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; otherwise the named device (which must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"params.yaml: device: {name!r} requested but CUDA is not available on this machine; "
                          "use device: auto (CUDA when present, else CPU) or device: cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ParamsError(f"params.yaml: device: {name!r} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); use cuda:0..{torch.cuda.device_count() - 1}")
    return device


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with `deterministic`, ask torch for deterministic kernels
    (warn-only, since a few CUDA backward kernels have no deterministic version)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
