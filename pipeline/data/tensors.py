"""Whole datasets as tensors on the run's device; batches are index slices (no per-sample Python)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


@dataclass
class DeviceDataset:
    """Both modalities and the labels of every sample, resident on one device.

    The batch schema is the same for every method and dataset: `m1`, `m2`, `y` and `index` (the
    sample's position in the full dataset, used by methods that keep per-sample state or caches).
    """

    m1: torch.Tensor
    m2: torch.Tensor
    y: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], device: torch.device) -> "DeviceDataset":
        return cls(m1=torch.from_numpy(np.ascontiguousarray(arrays["m1"])).to(device),
                   m2=torch.from_numpy(np.ascontiguousarray(arrays["m2"])).to(device),
                   y=torch.from_numpy(np.ascontiguousarray(arrays["labels"])).to(device))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.y.device

    def batch(self, index: torch.Tensor) -> Batch:
        """The samples at `index` (a 1-D long tensor on the dataset's device)."""
        return {"m1": self.m1[index], "m2": self.m2[index], "y": self.y[index], "index": index}

    def batches(self, index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Consecutive batches over `index`; shuffled by `generator` when one is given. The last
        batch may be smaller (drop_last=False, as the authors' loaders)."""
        if generator is not None:
            index = index[torch.randperm(len(index), generator=generator).to(index.device)]
        for start in range(0, len(index), batch_size):
            yield self.batch(index[start:start + batch_size])
