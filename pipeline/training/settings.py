"""The params blocks of the training loop: optimisation per dataset (`training`, `teacher_training`)
and the engine's rules (`engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.params import NON_NEGATIVE, POSITIVE, BlockError


@dataclass(frozen=True)
class TrainingParams:
    """Optimisation of the networks trained on one dataset: the epoch budget, batch size and the Adam
    learning rate (constant; the authors use no schedule). `patience` > 0 stops the main phase once its
    selection score has not improved for that many epochs, but never before `min_epochs` (a slow start,
    such as RKD's or CRD's initial plateau, is not cut short); 0 runs every epoch, as the authors do."""

    epochs: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    lr: float = field(metadata=POSITIVE)
    patience: int = field(default=0, metadata=NON_NEGATIVE)
    min_epochs: int = field(default=0, metadata=NON_NEGATIVE)

    def validate(self) -> None:
        if self.min_epochs > self.epochs:
            raise BlockError("min_epochs", f"must not exceed epochs ({self.epochs})")


@dataclass(frozen=True)
class EngineParams:
    """`selection`: which checkpoint is kept — `val_loss` (lowest validation CE; the authors' rule, Q9)
    or `val_accuracy`. `cache_frozen_outputs`: compute frozen teachers' outputs once per sample
    (exactly equivalent; false re-runs the teacher every batch). `data_residency`: where the prepared
    tensors live during training — `device` (copied to the run device), `mapped` (memory-mapped on the host,
    batches gathered and prefetched), `auto` (device when both modalities fit in half of its free memory).
    `flush_denormal`: on a CPU, flush denormal floats to zero (x86 computes with them ~20× slower, and
    FuseNet's gain-0.02 initialisation fills its activations and gradients with them: a 32×32 FuseNet epoch
    took 12 s instead of 0.6 s); GPUs are not affected."""

    selection: Literal["val_loss", "val_accuracy"]
    cache_frozen_outputs: bool
    data_residency: Literal["auto", "device", "mapped"] = "auto"
    flush_denormal: bool = True
