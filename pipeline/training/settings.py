"""The params blocks of the training loop: optimisation per dataset (`training`, `teacher_training`)
and the engine's rules (`engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.params import POSITIVE


@dataclass(frozen=True)
class TrainingParams:
    """Optimisation of the networks trained on one dataset: epochs, batch size and the Adam learning rate
    (constant; the authors use no schedule)."""

    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    lr: float = field(metadata=POSITIVE)


@dataclass(frozen=True)
class EngineParams:
    """`selection`: which checkpoint is kept — `val_loss` (lowest validation CE; the authors' rule, Q9)
    or `val_accuracy`. `cache_frozen_outputs`: compute frozen teachers' outputs once per sample
    (exactly equivalent; false re-runs the teacher every batch)."""

    selection: Literal["val_loss", "val_accuracy"]
    cache_frozen_outputs: bool
