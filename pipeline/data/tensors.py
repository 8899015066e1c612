"""Whole datasets as tensors on the run's device; batches are index slices (no per-sample Python).

A modality too large for the run device's memory (RAVDESS video: 13 GB as float32, VGGSound visual features:
about 50 GB) stays a memory-mapped file on the host: a batch gathers its rows from the map (sorted, so reads
are forward), pins them and copies them to the device, and the next batch is gathered in a background thread
while the current one trains (prefetch). Values are the same either way; only where they live differs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Batch = dict[str, torch.Tensor]
# Label value of an entry no loss or metric counts (segmentation void): PyTorch's default `ignore_index`, so
# `F.cross_entropy(logits, y)` skips it exactly as the authors' `ignore_index=0` (the void class) does.
IGNORE = -100
Residency = Literal["auto", "device", "mapped"]


class MappedModality:
    """One modality left in a (memory-mapped) host array; `self[index]` gathers those samples onto `device`."""

    def __init__(self, array: np.ndarray, device: torch.device) -> None:
        self.array = array
        self.device = device
        self.shape = torch.Size(array.shape)
        self.dtype = torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, device: torch.device) -> "MappedModality":
        return MappedModality(self.array, torch.device(device))

    def __reduce__(self):
        # sent to another process (a spawned worker, a Ray task), a whole-file map is reopened there by name
        # instead of being copied; another array is pickled as it is
        array = self.array
        if (isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous
                and os.path.exists(array.filename) and array.offset + array.nbytes == os.path.getsize(array.filename)):
            return _reopen_mapped, (array.filename, array.dtype.str, array.offset, array.shape, str(self.device))
        return MappedModality, (np.asarray(array), self.device)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        positions = index.detach().cpu().numpy()
        order = np.argsort(positions, kind="stable")
        rows = np.empty((len(positions), *self.array.shape[1:]), dtype=self.array.dtype)
        rows[order] = self.array[positions[order]]        # forward reads through the map
        tensor = torch.from_numpy(rows)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def _reopen_mapped(filename: str, dtype: str, offset: int, shape: tuple[int, ...], device: str) -> MappedModality:
    return MappedModality(np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape),
                          torch.device(device))


def device_budget_bytes(device: torch.device) -> int:
    """Bytes a dataset may occupy on `device` under `auto` residency: half of the GPU's free memory, or half
    of the host's physical memory for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_residency(arrays: dict[str, np.ndarray], device: torch.device, residency: Residency) -> str:
    """`device` (both modalities copied to the run device) or `mapped` (left in host maps); `auto` copies
    when both fit in device_budget_bytes."""
    if residency != "auto":
        return residency
    total = sum(arrays[key].nbytes for key in ("m1", "m2"))
    return "device" if total <= device_budget_bytes(device) else "mapped"


@dataclass
class DeviceDataset:
    """Both modalities and the labels of every sample, resident on one device.

    The batch schema is the same for every method and dataset: `m1`, `m2`, `y` and `index` (the
    sample's position in the full dataset, used by methods that keep per-sample state or caches). `y` is
    (N,) for classification and (N, H, W) for segmentation; labels of the dataset's `ignore_label` (void)
    hold IGNORE, the task adapted once here so that no loss needs a dataset or task branch.
    """

    m1: torch.Tensor | MappedModality
    m2: torch.Tensor | MappedModality
    y: torch.Tensor
    ignore_label: int | None = None     # the class the authors ignore (NYU: 0 = void), stored as IGNORE

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], device: torch.device,
                    residency: Residency = "device", ignore_label: int | None = None) -> "DeviceDataset":
        """The dataset on `device`; with `mapped` (or `auto` when it does not fit), m1 and m2 stay in the
        given (memory-mapped) arrays and batches are gathered from them. Labels always live on the device,
        those of `ignore_label` replaced by IGNORE."""
        where = choose_residency(arrays, device, residency)
        if where == "mapped":
            m1, m2 = (MappedModality(arrays[key], device) for key in ("m1", "m2"))
        else:
            m1, m2 = (torch.from_numpy(np.array(arrays[key])).to(device) for key in ("m1", "m2"))
        y = torch.from_numpy(np.array(arrays["labels"])).to(device)
        if ignore_label is not None:
            y = torch.where(y == ignore_label, torch.full_like(y, IGNORE), y)
        return cls(m1=m1, m2=m2, y=y, ignore_label=ignore_label)

    def to(self, device: torch.device) -> "DeviceDataset":
        """The same dataset with its tensors on `device` (a mapped modality stays mapped, gathering onto it)."""
        return DeviceDataset(m1=self.m1.to(device), m2=self.m2.to(device), y=self.y.to(device),
                             ignore_label=self.ignore_label)

    @property
    def mapped(self) -> bool:
        return isinstance(self.m1, MappedModality)

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
        chunks = [index[start:start + batch_size] for start in range(0, len(index), batch_size)]
        if not self.mapped:
            for chunk in chunks:
                yield self.batch(chunk)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:   # gather batch i+1 while batch i trains
            pending = pool.submit(self.batch, chunks[0]) if chunks else None
            for i in range(len(chunks)):
                ready = pending.result()
                pending = pool.submit(self.batch, chunks[i + 1]) if i + 1 < len(chunks) else None
                yield ready
