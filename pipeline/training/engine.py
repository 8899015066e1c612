"""The one training loop: it runs the phases a method declares, in order.

Every phase is the same loop: shuffled index-slice batches of the training split, one optimiser step
per batch on the sum of the phase's named loss terms, validation after every epoch, and the phase's
selection rule (for the main phase of every method: the lowest validation cross-entropy of the student,
the authors' rule, quirk Q9, or by switch the highest validation accuracy). A phase with `patience` stops
once its selection score has not improved for that many epochs (never before `min_epochs`); a phase whose
training loss turns non-finite stops at that epoch (later epochs could only train NaNs) and keeps the
weights it had selected before, as the authors' min-val-loss rule would. After the last phase the
networks the method names are evaluated on the test split twice: with the last epoch's weights and with
the selected ones (the reported number).

The engine knows nothing about methods beyond `phases(context)` and `evaluated_networks()`; methods never
import it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipeline.data.tensors import Batch
from pipeline.models.registry import Network
from pipeline.training.evaluation import Evaluation
from pipeline.training.phases import Phase, RunContext

# log(phase name, epoch, metrics)
PhaseLog = Callable[[str, int, dict[str, float]], None]


class Trainable(Protocol):
    """What the engine needs from a method."""

    def to(self, device: torch.device) -> Any: ...

    def phases(self, context: RunContext) -> list[Phase]: ...

    def evaluated_networks(self) -> dict[str, Network]: ...


STOP_COMPLETED = "completed"          # every epoch ran
STOP_EARLY = "early_stopping"          # the selection score stopped improving (patience)
STOP_NON_FINITE = "non_finite_loss"    # the training loss became NaN or infinite


@dataclass
class PhaseResult:
    name: str
    epochs: int                        # epochs that ran
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    best_states: list[dict[str, torch.Tensor]] | None = None
    stopped: str = STOP_COMPLETED
    max_epochs: int = 0                # the phase's budget


@dataclass
class TrainResult:
    phases: list[PhaseResult]
    test: dict[str, Evaluation]        # selected weights (the reported number), per evaluated network
    test_last: dict[str, Evaluation]   # the last epoch's weights

    @property
    def final(self) -> PhaseResult:
        return self.phases[-1]


def optimise_epoch(loss_terms: Callable[[Batch], Mapping[str, torch.Tensor]], batches: Iterable[Batch],
                   optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
    """One pass of gradient steps on the sum of the named loss terms; returns each term's epoch mean of
    per-batch means (the authors' convention) as `train_<name>`, plus `train_loss` (which may be non-finite:
    the caller decides)."""
    sums: dict[str, torch.Tensor] = {}
    n_batches = 0
    for batch in batches:
        terms = loss_terms(batch)
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n_batches += 1
        for name, value in (*terms.items(), ("loss", loss)):  # summed on-device, read once per epoch
            sums[f"train_{name}"] = sums.get(f"train_{name}", 0.0) + value.detach()
    if n_batches == 0:
        raise ValueError(f"epoch {epoch}: the training split is empty")
    return {name: total.item() / n_batches for name, total in sums.items()}


def run_phase(phase: Phase, context: RunContext, log: PhaseLog | None = None,
              before_restore: Callable[[], None] | None = None) -> PhaseResult:
    """Train one phase and restore its selected weights; `before_restore()` runs just before that."""
    if phase.before is not None:
        phase.before()
    optimizer = phase.optimizer()
    best_score, best_epoch, best_states, best_metrics = math.inf, -1, None, {}
    history: list[dict[str, float]] = []
    stopped = STOP_COMPLETED
    for epoch in range(phase.epochs):
        for module in phase.train_modules:
            module.train()
        for module in phase.frozen:
            module.eval()
        metrics = optimise_epoch(lambda batch: phase.loss_terms(batch, epoch),
                                 context.batches("train", phase.batch_size, shuffle=True), optimizer, epoch)
        if not math.isfinite(metrics["train_loss"]):
            metrics["best_epoch"] = best_epoch
            history.append({"epoch": epoch, **metrics})
            if log is not None:
                log(phase.name, epoch, metrics)
            stopped = STOP_NON_FINITE
            break
        if phase.validate is not None:
            metrics.update(phase.validate(epoch))
        if phase.epoch_values is not None:
            metrics.update(phase.epoch_values(epoch))
        if phase.score is None:
            best_epoch, best_metrics = epoch, dict(metrics)
        else:
            score = phase.score(metrics, epoch)
            if score < best_score:
                best_score, best_epoch, best_metrics = score, epoch, dict(metrics)
                best_states = [copy.deepcopy(module.state_dict()) for module in phase.selected]
        metrics["best_epoch"] = best_epoch
        history.append({"epoch": epoch, **metrics})
        if log is not None:
            log(phase.name, epoch, metrics)
        if _patience_ran_out(phase, epoch, best_epoch):
            stopped = STOP_EARLY
            break
    if before_restore is not None:
        before_restore()
    if best_states is not None:
        for module, state in zip(phase.selected, best_states, strict=True):
            module.load_state_dict(state)
    if phase.after is not None:
        phase.after()
    return PhaseResult(phase.name, len(history), best_epoch, best_metrics, history, best_states, stopped,
                       phase.epochs)


def _patience_ran_out(phase: Phase, epoch: int, best_epoch: int) -> bool:
    """Early stopping: the score has not improved for `patience` epochs, `min_epochs` have run, and some
    epoch was selected (a phase whose scores are all infinite, e.g. before C²KD's late selection window,
    never stops early)."""
    return (phase.patience > 0 and best_epoch >= 0 and epoch + 1 >= phase.min_epochs
            and epoch - best_epoch >= phase.patience)


def train(method: Trainable, context: RunContext, log: PhaseLog | None = None) -> TrainResult:
    """Run every phase of `method` and evaluate its networks on the test split (last and selected weights)."""
    method.to(context.device)
    phases = method.phases(context)
    if not phases:
        raise ValueError("a method must declare at least one phase")
    test_last: dict[str, Evaluation] = {}

    def evaluate_last() -> None:
        test_last.update({role: context.evaluate(net, "test") for role, net in method.evaluated_networks().items()})

    results = [run_phase(phase, context, log, evaluate_last if i == len(phases) - 1 else None)
               for i, phase in enumerate(phases)]
    test = {role: context.evaluate(net, "test") for role, net in method.evaluated_networks().items()}
    return TrainResult(results, test, test_last)
