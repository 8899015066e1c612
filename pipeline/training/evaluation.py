"""Evaluation of a network on a part of the data, with the authors' loss convention."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.tensors import DeviceDataset
from pipeline.models.registry import Network


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_accuracy": self.accuracy}


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
