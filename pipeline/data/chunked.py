"""A modality produced block by block, for arrays larger than memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChunkedArray:
    """A modality too large to hold in memory (RAVDESS video: 13 GB as float32; VGGSound visual features:
    about 50 GB), produced block by block along the sample axis, e.g. normalised from a memory-mapped file.
    `blocks()` yields consecutive blocks whose lengths add up to `shape[0]`."""

    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[np.ndarray]]

    def __len__(self) -> int:
        return self.shape[0]
