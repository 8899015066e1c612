"""What a method hands the training loop: its phases, and the context each phase runs in.

A :class:`Phase` is one stretch of gradient steps with its own trained modules, loss terms, optimiser,
number of epochs, per-epoch validation and selection rule (FitNets' hint phase, MGDFR's co-training,
MST-Distill's collaborative initialisation, specialist adaptation and dynamic distillation, the main
phase of every other method). The one loop in `engine.py` runs them in order; each phase logs under its
own metric prefix (`<phase name>/...`) with its own epoch axis.

Methods import this module and never the engine: everything a phase needs from the data (batches,
evaluation) comes through the :class:`RunContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.data.tensors import Batch, DeviceDataset
from pipeline.models.registry import Network
from pipeline.training.evaluation import Evaluation, evaluate

LossTerms = Callable[[Batch, int], Mapping[str, torch.Tensor]]


@dataclass
class RunContext:
    """The data and settings of one run: its split, the optimisation block, the selection rule and the
    run's shuffling generator (shared by every phase, in phase order)."""

    data: DeviceDataset
    split: dict[str, torch.Tensor]            # "train", "val", "test" positions in the full dataset
    batch_size: int
    epochs: int                               # the run's main-phase epochs (its budget)
    lr: float
    num_classes: int
    generator: torch.Generator
    selection: str = "val_loss"               # engine.selection: val_loss | val_accuracy
    eval_batch_size: int | None = None        # validation batch (the authors: the training batch)
    patience: int = 0                         # main-phase early stopping (0: off)
    min_epochs: int = 0

    @property
    def device(self) -> torch.device:
        return self.data.device

    def batches(self, part: str, batch_size: int | None = None, shuffle: bool = False) -> Iterator[Batch]:
        """Batches of split `part`; shuffled by the run's generator when `shuffle`."""
        return self.data.batches(self.split[part], batch_size or self.batch_size,
                                 self.generator if shuffle else None)

    def evaluate(self, network: Network, part: str) -> Evaluation:
        """CE (mean of per-batch means at the validation batch size) and accuracy of `network` on `part`."""
        return evaluate(network, self.data, self.split[part], self.num_classes,
                        self.eval_batch_size or self.batch_size)

    def sample(self, n: int = 4) -> Batch:
        """The first `n` training samples (for sizing modules by feature shape), on the data's device."""
        return self.data.batch(self.split["train"][:n])


@dataclass
class Phase:
    """One training phase.

    `loss_terms(batch, epoch)`: named, weighted terms; their sum is minimised. `optimizer()`: built when
    the phase starts (after `before()`). `train_modules`: put in train mode before every epoch.
    `validate(epoch)`: metrics after each epoch (logged). `score(metrics, epoch)`: selection score, lower
    is better; None keeps the last epoch. `selected`: modules whose weights are snapshotted at the best
    epoch and restored at the end of the phase. `before()` / `after()`: once at the start / end (caches,
    a salience pass, dropping helper modules). `epoch_values(epoch)`: scalars to log (loss weights).
    `frozen`: modules kept in eval mode through the phase. `batch_size`: default the run's. `patience`,
    `min_epochs`: early stopping on the selection score (0: run every epoch)."""

    name: str
    epochs: int
    loss_terms: LossTerms
    optimizer: Callable[[], torch.optim.Optimizer]
    train_modules: Sequence[nn.Module]
    validate: Callable[[int], dict[str, float]] | None = None
    score: Callable[[dict[str, float], int], float] | None = None
    selected: Sequence[nn.Module] = ()
    batch_size: int | None = None
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    epoch_values: Callable[[int], dict[str, float]] | None = None
    frozen: Sequence[nn.Module] = field(default_factory=tuple)   # kept in eval mode through the phase
    patience: int = 0
    min_epochs: int = 0
