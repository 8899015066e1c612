"""Evaluation of a network on a part of the data, with the authors' loss convention and metrics.

Classification and segmentation share one path: a label tensor per sample (a scalar or an H×W map) whose
ignored entries (segmentation void) hold IGNORE, so cross-entropy skips them as the authors'
`ignore_index=0` does, and one confusion matrix over every counted label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.tensors import IGNORE, DeviceDataset
from pipeline.models.registry import Network

# Logit elements per evaluation chunk: large chunks for classification, a few images for dense outputs
# (a 480×640 NYU image has 12.6 M logits).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)   # authors' model_metrics: oa, aa, miou

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_accuracy": self.accuracy}


def round_half_up(value: float, places: int = 4) -> float:
    """`value` rounded to `places` decimals half away from zero through Decimal, as the authors' `metrics`."""
    if not np.isfinite(value):
        return float(value)
    return float(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def confusion_metrics(confusion: np.ndarray, labels: list[int] | None = None) -> dict[str, float]:
    """OA, AA and mIoU of a confusion matrix (rows true, columns predicted) restricted to `labels` (all
    classes by default), exactly as the authors' `utils.metrics` (official-mst-spec.md §8.2): OA =
    trace/total; AA = mean over classes with ground truth of diagonal/row sum; mIoU = NaN-ignoring mean of
    TP/(TP+FP+FN) over the classes; each rounded to 4 decimals half-up."""
    labels = list(range(len(confusion))) if labels is None else labels
    matrix = confusion[np.ix_(labels, labels)].astype(np.float64)
    total = matrix.sum()
    tp = np.diag(matrix)
    rows, cols = matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp / rows
        iou = tp / (rows + cols - tp)
    oa = tp.sum() / total if total else float("nan")
    aa = float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return {"oa": round_half_up(oa), "aa": round_half_up(aa), "miou": round_half_up(miou)}


@torch.no_grad()
def evaluate(network: Network, data: DeviceDataset, index: torch.Tensor, num_classes: int,
             batch_size: int = 1024, chunk_size: int = 1024) -> Evaluation:
    """Cross-entropy as the authors compute it (the mean over consecutive batches of `batch_size` of each
    batch's mean over its counted labels) and accuracy of `network` on `index`. In eval mode a sample's
    output does not depend on its batch, so the network runs on large chunks and the per-sample losses are
    grouped into the authors' batches afterwards: the same value, fewer and larger kernels.

    Where the data has an ignored class (segmentation void), targets of that class are left out, and so are
    pixels predicted as it: the authors' sklearn confusion matrix over the other labels drops them (spec
    §8.2 quirk), so they count neither as right nor as wrong. `accuracy` is then the authors' OA."""
    was_training = network.training
    network.eval()
    per_label = int(data.y[0].numel()) if len(data.y) else 1
    chunk_size = max(1, min(chunk_size, CHUNK_ELEMENTS // (per_label * num_classes)))
    sums, counts = [], []
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=data.device)
    for batch in data.batches(index, chunk_size):
        logits = network(batch)
        y = batch["y"]
        losses = F.cross_entropy(logits, y, reduction="none")   # 0 where y is IGNORE
        sums.append(losses.double().reshape(len(y), -1).sum(dim=1))
        labelled = y != IGNORE
        counts.append(labelled.reshape(len(y), -1).sum(dim=1))
        pred = logits.argmax(dim=1)
        counted = labelled
        if data.ignore_label is not None:
            counted &= pred != data.ignore_label
        confusion += torch.bincount(y[counted] * num_classes + pred[counted], minlength=num_classes**2)
    network.train(was_training)
    per_sample, per_count = torch.cat(sums).cpu(), torch.cat(counts).cpu()
    batch_means = [(s.sum() / c.sum()).item() for s, c in zip(per_sample.split(batch_size), per_count.split(batch_size))]
    matrix = confusion.reshape(num_classes, num_classes).cpu().numpy()
    total = matrix.sum()
    labels = [c for c in range(num_classes) if c != data.ignore_label]
    return Evaluation(loss=float(np.mean(batch_means)), accuracy=float(np.trace(matrix) / total) if total else 0.0,
                      confusion=matrix,
                      metrics=confusion_metrics(matrix, labels) if data.ignore_label is not None else {})
