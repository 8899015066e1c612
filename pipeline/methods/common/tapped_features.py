"""Tapped, optionally pooled and flattened features and their L2-normalised embeddings: the feature
reading that RKD and CRD share (baselines-spec.md §2.6, §2.7: same taps, same `Embed`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.tensors import Batch
from pipeline.models.registry import Network
from pipeline.models.taps import FeatureTaps


@dataclass(frozen=True)
class FeatureTap:
    """One tapped feature: the output of module `module` (relative to `net.body`), max-pooled with a
    `pool`×`pool` window when `pool` ≥ 2 (0 or 1: no pooling), then flattened to (B, d)."""

    module: str
    pool: int = field(metadata={"check": (lambda v: v >= 0, "an integer >= 0 (0 or 1: no pooling)")})


@dataclass(frozen=True)
class PairTaps:
    """The teacher tap and the student tap of one teacher → student pair."""

    teacher: FeatureTap
    student: FeatureTap



class L2Embedding(nn.Module):
    """x ↦ normalise(W·flatten(x) + b), the authors' `Embed` (Linear then L2 normalisation)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2, dim=1)


class TappedNetwork(nn.Module):
    """`net(batch)` returning (logits, tapped feature) from one forward pass; the feature is max-pooled by
    `tap.pool` when ≥ 2 and flattened to (B, d)."""

    def __init__(self, network: Network, tap: FeatureTap, where: str) -> None:
        super().__init__()
        self.network = network
        self.tap = tap
        self.where = where
        FeatureTaps(network.body, [tap.module])  # a missing module is a KeyError now, not mid-training

    @torch.no_grad()
    def width(self, sample: Batch) -> int:
        """d of the flattened tapped feature, from one eval-mode forward of `sample` (moved to the
        network's device: the pipeline builds the student on the CPU, the sample lives with the data)."""
        device = next(self.network.parameters()).device
        was_training = self.network.training
        self.network.eval()
        try:
            return self({key: value.to(device) for key, value in sample.items()})[1].shape[1]
        finally:
            self.network.train(was_training)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with FeatureTaps(self.network.body, [self.tap.module]) as taps:
            logits = self.network(batch)
            feature = taps[self.tap.module]
        if self.tap.pool >= 2:
            if feature.dim() != 4:
                raise ValueError(f"{self.where}.pool is {self.tap.pool}, but module {self.tap.module!r} outputs "
                                 f"shape {tuple(feature.shape)}; pooling needs a (B, C, H, W) map (use pool: 0)")
            feature = F.max_pool2d(feature, self.tap.pool)
        return logits, feature.flatten(1)
