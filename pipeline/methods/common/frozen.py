"""Outputs of a frozen network, computed once per sample and reused every epoch.

A frozen teacher in eval mode with no augmentation is a fixed function of the sample, so its
logits for the training set can be computed once; reading them back by sample index is exactly
what recomputing them in each batch would give (up to floating-point rounding of batched kernels).
With `enabled=False` the teacher is re-run on every batch instead, for checking that claim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.data.tensors import Batch, DeviceDataset, device_budget_bytes
from pipeline.models.registry import Network

INPUT_ELEMENTS_PER_CHUNK = 1 << 24   # a chunk's input elements: whole chunks of small samples, a few images


class FrozenOutputs:
    """Outputs of a frozen network (or any fixed function of the batch, e.g. several specialised
    teachers stacked), cached by sample index, or recomputed per batch if disabled."""

    def __init__(self, network: Network | Callable[[Batch], torch.Tensor], enabled: bool = True,
                 chunk_size: int = 1024) -> None:
        self.network = network
        self.enabled = enabled
        self.chunk_size = chunk_size
        self._table: torch.Tensor | None = None

    def _compute(self, batch: Batch) -> torch.Tensor:
        if isinstance(self.network, nn.Module):
            self.network.eval()
        return self.network(batch)

    @torch.no_grad()
    def prepare(self, data: DeviceDataset, index: torch.Tensor) -> None:
        """Run the network once (eval mode, no grad) over the samples at `index` and keep the results."""
        if not self.enabled:
            return
        sample = data.batch(index[:1])
        per_sample = sum(sample[key][0].numel() for key in ("m1", "m2"))
        chunk_size = max(1, min(self.chunk_size, INPUT_ELEMENTS_PER_CHUNK // per_sample))
        table = None
        for start in range(0, len(index), chunk_size):
            chunk = index[start:start + chunk_size]
            out = self._compute(data.batch(chunk))
            if table is None:
                needed = len(data) * out[0].numel() * out.element_size()
                if needed > device_budget_bytes(out.device) // 2:
                    # e.g. NYU-Depth-V2: 4 teachers' 41×480×640 logits per image, ~175 GB; recomputing per
                    # batch gives the same values (the teachers are frozen and deterministic)
                    self.enabled = False
                    return
                # NaN marks samples that were not cached, so a stray lookup is visible
                table = torch.full((len(data), *out.shape[1:]), float("nan"), device=out.device, dtype=out.dtype)
            table[chunk] = out
        self._table = table

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        if not self.enabled:
            return self._compute(batch)
        if self._table is None:
            raise RuntimeError("FrozenOutputs.prepare() must run before the cached outputs are read")
        return self._table[batch["index"]]
