"""The one training engine every method runs through.

Adam with a constant learning rate (the authors use no schedule), shuffled index-slice batches,
validation after every epoch, and model selection on the validation cross-entropy (the authors' rule,
quirk Q9) or, by switch, on validation accuracy. The test split is evaluated with the selected
checkpoint and with the last epoch's weights; both are reported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch, DeviceDataset
from pipeline.methods.base import DistillationMethod, TrainContext
from pipeline.models.registry import Network

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class EngineConfig:
    epochs: int
    batch_size: int
    lr: float
    selection: str = "val_loss"  # or "val_accuracy"
    eval_batch_size: int = 1024


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_accuracy": self.accuracy}


@dataclass
class TrainResult:
    best_epoch: int
    best_val: Evaluation
    test: Evaluation           # selected (best-validation) checkpoint: the reported number
    test_last: Evaluation      # last epoch's weights
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate(network: Network, data: DeviceDataset, index: torch.Tensor, num_classes: int,
             batch_size: int = 1024, chunk_size: int = 1024) -> Evaluation:
    """Cross-entropy as the authors compute it (the mean over consecutive batches of `batch_size` of each
    batch's mean) and accuracy of `network` on `index`. In eval mode a sample's output does not depend on
    its batch, so the network runs on large chunks and the per-sample losses are grouped into the
    authors' batches afterwards: the same value, fewer and larger kernels."""
    was_training = network.training
    network.eval()
    losses, predictions, targets = [], [], []
    for batch in data.batches(index, chunk_size):
        logits = network(batch)
        losses.append(F.cross_entropy(logits, batch["y"], reduction="none"))
        predictions.append(logits.argmax(dim=1))
        targets.append(batch["y"])
    network.train(was_training)
    per_sample = torch.cat(losses).double().cpu()
    batch_means = [chunk.mean().item() for chunk in per_sample.split(batch_size)]
    pred = torch.cat(predictions).cpu()
    true = torch.cat(targets).cpu()
    confusion = torch.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    return Evaluation(loss=float(np.mean(batch_means)), accuracy=float((pred == true).float().mean()),
                      confusion=confusion.numpy())


def optimise_epoch(loss_terms: Callable[[Batch], Mapping[str, torch.Tensor]], batches: Iterable[Batch],
                   optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
    """One pass of gradient steps on the sum of the named loss terms; returns each term's epoch mean of
    per-batch means (the authors' convention) as `train_<name>`, plus `train_loss`."""
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
    metrics = {name: total.item() / n_batches for name, total in sums.items()}
    if not math.isfinite(metrics["train_loss"]):
        raise FloatingPointError(f"epoch {epoch}: the training loss is not finite ({metrics})")
    return metrics


def train(method: DistillationMethod, data: DeviceDataset, split: dict[str, torch.Tensor], config: EngineConfig,
          num_classes: int, generator: torch.Generator, on_epoch: EpochCallback | None = None,
          on_prepare: EpochCallback | None = None) -> TrainResult:
    """Train `method.student` (and the method's own trainable modules) and select a checkpoint.
    `on_prepare(step, metrics)` receives what a method's pre-stage logs (e.g. FitNets' hint epochs)."""
    method.to(data.device)
    context = TrainContext(data, split, config.batch_size, config.epochs, config.lr, num_classes, generator,
                           log=(lambda m, step: on_prepare(step, m)) if on_prepare else (lambda m, step: None))
    method.prepare(context)
    optimizer = method.configure_optimizer(config.lr)
    student = method.student
    best_score, best_epoch, best_state, best_val = math.inf, -1, None, None
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        method.train()
        metrics = optimise_epoch(lambda batch: method.loss_terms(batch, epoch),
                                 data.batches(split["train"], config.batch_size, generator), optimizer, epoch)
        val = evaluate(student, data, split["val"], num_classes, config.eval_batch_size)
        metrics.update(val.as_dict("val"))
        metrics.update(method.epoch_values(epoch))
        score = method.validation_score(context, epoch)
        if score is None:
            score = val.loss if config.selection == "val_loss" else -val.accuracy
        else:
            metrics["val_selection_score"] = score
        if score < best_score:
            best_score, best_epoch, best_val = score, epoch, val
            best_state = copy.deepcopy(student.state_dict())
        metrics["best_epoch"] = best_epoch
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    test_last = evaluate(student, data, split["test"], num_classes, config.eval_batch_size)
    student.load_state_dict(best_state)
    test = evaluate(student, data, split["test"], num_classes, config.eval_batch_size)
    return TrainResult(best_epoch=best_epoch, best_val=best_val, test=test, test_last=test_last,
                       best_state=best_state, history=history)
