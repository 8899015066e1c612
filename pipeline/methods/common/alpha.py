"""The α weighting shared by the baselines the authors run as (1 − α)·CE + α·L (KD, MLLD, FitNets, OFA,
RKD, CRD, MGDFR): one params block shape and one implementation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.params import PROBABILITY, check


@dataclass(frozen=True)
class AlphaParams:
    """α for each epoch. `schedule: authors_step`: `initial` multiplied by `decay_factor` after every
    `decay_every` epochs (the authors' main-KD.py and siblings: 0.5 for epochs 1–30, 0.25 for 31–60, …);
    `constant`: `initial` throughout (Hinton's KD and the original papers)."""

    initial: float = field(metadata=PROBABILITY)
    schedule: Literal["authors_step", "constant"] = "authors_step"
    decay_every: int = field(default=30, metadata=check(lambda v: v > 0, "an integer > 0"))
    decay_factor: float = field(default=0.5, metadata=PROBABILITY)

    def __call__(self, epoch: int) -> float:
        """α during 0-based `epoch`."""
        if self.schedule == "constant":
            return self.initial
        return self.initial * self.decay_factor ** (epoch // self.decay_every)

    def weigh(self, epoch: int, ce: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"ce": (1 − α)·CE, name: α·term for each distillation term}: the authors' loss at `epoch`."""
        alpha = self(epoch)
        return {"ce": (1 - alpha) * ce, **{name: alpha * value for name, value in terms.items()}}

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return {"alpha": self(epoch)}
