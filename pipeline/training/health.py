"""Run health: whether a trained network learnt anything, judged from its own history.

A verdict has three possible problems, each computed from what the run recorded:

- `stayed_at_chance`: no epoch's validation accuracy rose above chance by more than three binomial
  standard deviations (1/C + 3·sqrt((1/C)(1 − 1/C)/n_val)): the run never left its initial plateau;
- `constant_prediction`: at least `CONSTANT_SHARE` of the selected checkpoint's test predictions are one
  class (a dead network, e.g. C²KD's students whose first-layer channels all died);
- `non_finite_loss`: a phase's training loss became NaN or infinite (the phase stopped there).

Reports mark a table cell where any seed is flagged (`reports/health.md` lists the runs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

CONSTANT_SHARE = 0.9
CHANCE_SIGMAS = 3.0


@dataclass(frozen=True)
class Health:
    problems: list[str] = field(default_factory=list)
    left_plateau_epoch: int | None = None     # first epoch above the chance threshold
    chance_threshold: float | None = None     # validation accuracy that counts as above chance

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"verdict": "healthy" if self.healthy else "flagged", **asdict(self)}


def chance_threshold(num_classes: int, n_val: int) -> float:
    """Validation accuracy above which a run has left chance: 1/C + 3 binomial standard deviations."""
    p = 1.0 / num_classes
    return p + CHANCE_SIGMAS * math.sqrt(p * (1 - p) / max(n_val, 1))


def assess(val_accuracies: Sequence[float] | None, confusion: np.ndarray | None, non_finite: bool,
           num_classes: int, n_val: int) -> Health:
    """The verdict of one network: `val_accuracies` per epoch (None when the phase has no accuracy, e.g.
    MaskNets), `confusion` of its test predictions (rows true, columns predicted; None when not tested)."""
    problems = []
    threshold = left = None
    if val_accuracies is not None:
        threshold = round(chance_threshold(num_classes, n_val), 6)
        left = next((epoch for epoch, acc in enumerate(val_accuracies) if acc > threshold), None)
        if left is None:
            problems.append("stayed_at_chance")
    if confusion is not None and confusion.sum() > 0:
        if confusion.sum(axis=0).max() >= CONSTANT_SHARE * confusion.sum():
            problems.append("constant_prediction")
    if non_finite:
        problems.append("non_finite_loss")
    return Health(problems, left, threshold)
