"""Semantic segmentation in the one engine: void labels adapted once (IGNORE), cross-entropy and the authors'
per-pixel KL on dense logits, the authors' `model_metrics` (OA, AA, mIoU) against hand-computed confusion
matrices, and the dense MST-Distill router."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.tensors import IGNORE, DeviceDataset
from pipeline.methods.common.kl import softened_kl
from pipeline.methods.mst.gate_net import DenseGateNet, GateNet, gate_net_for
from pipeline.methods.mst.losses import topk_distillation
from pipeline.models.registry import Network
from pipeline.training.evaluation import confusion_metrics, evaluate, round_half_up


def test_metrics_equal_a_hand_computed_confusion_matrix():
    # rows true, columns predicted, classes 1..3 (0 = void left out): class 3 never occurs nor is predicted
    confusion = np.zeros((4, 4), dtype=np.int64)
    confusion[1, 1], confusion[1, 2] = 3, 1      # class 1: 4 pixels, 3 right
    confusion[2, 2], confusion[2, 1] = 2, 2      # class 2: 4 pixels, 2 right
    metrics = confusion_metrics(confusion, [1, 2, 3])
    assert metrics["oa"] == 0.625                                  # (3 + 2) / 8
    assert metrics["aa"] == 0.625                                  # mean(3/4, 2/4); class 3 (no truth) skipped
    # IoU_1 = 3 / (4 + 5 - 3) = 0.5, IoU_2 = 2 / (4 + 3 - 2) = 0.4, IoU_3 = 0/0 -> NaN, skipped
    assert metrics["miou"] == 0.45


def test_a_class_predicted_but_never_true_counts_in_miou_with_iou_zero():
    confusion = np.zeros((3, 3), dtype=np.int64)
    confusion[1, 1], confusion[1, 2] = 1, 2      # class 2 has no truth but is predicted twice
    metrics = confusion_metrics(confusion, [1, 2])
    assert metrics["oa"] == round_half_up(1 / 3) == 0.3333
    assert metrics["aa"] == 0.3333                                 # recall of class 2 is 0/0: skipped
    assert metrics["miou"] == round_half_up((1 / 3 + 0.0) / 2) == 0.1667


def test_round_half_up_rounds_halves_away_from_zero_like_decimal():
    assert round_half_up(0.12345) == 0.1235      # Python's round gives 0.1234 (binary representation)
    assert round_half_up(0.5) == 0.5 and math.isnan(round_half_up(float("nan")))


class _Fixed(nn.Module):
    """Returns stored logits for the batch's samples."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, m1: torch.Tensor) -> torch.Tensor:
        return self.logits[m1[:, 0, 0, 0].long()]


def _dataset(labels: np.ndarray) -> DeviceDataset:
    n = len(labels)
    m1 = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, *labels.shape[1:])).copy()
    return DeviceDataset.from_arrays({"m1": m1, "m2": m1.copy(), "labels": labels}, torch.device("cpu"),
                                     ignore_label=0)


def test_void_is_stored_as_ignore_and_skipped_by_cross_entropy_like_ignore_index_zero():
    labels = np.array([[[0, 1], [2, 0]]], dtype=np.int64)
    data = _dataset(labels)
    assert data.y.tolist() == [[[IGNORE, 1], [2, IGNORE]]] and data.ignore_label == 0
    logits = torch.randn(1, 3, 2, 2)
    ours = F.cross_entropy(logits, data.y)
    authors = F.cross_entropy(logits, torch.from_numpy(labels), ignore_index=0)
    assert torch.allclose(ours, authors)


def test_evaluation_drops_void_targets_and_pixels_predicted_as_void():
    # one 2x3 image, classes 0 (void), 1, 2
    labels = np.array([[[0, 1, 1], [2, 2, 1]]], dtype=np.int64)
    predicted = torch.tensor([[[1, 1, 0], [2, 1, 1]]])     # the void target is dropped; pixel (0,2) predicted void
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 5
    data = _dataset(labels)
    net = Network("fixed", _Fixed(logits), ["m1"])
    result = evaluate(net, data, torch.arange(1), num_classes=3)
    # counted pixels: (0,1) 1->1, (1,0) 2->2, (1,1) 2->1, (1,2) 1->1 ; (0,0) void target, (0,2) predicted void
    assert result.confusion.tolist() == [[0, 0, 0], [0, 2, 0], [0, 1, 1]]
    assert result.metrics["oa"] == 0.75 and result.accuracy == 0.75
    assert result.metrics["aa"] == 0.75                          # mean(2/2, 1/2)
    assert result.metrics["miou"] == round_half_up((2 / 3 + 1 / 2) / 2)
    # the loss is the mean CE over the five non-void pixels (the predicted-void pixel counts in the loss)
    expected = F.cross_entropy(logits, torch.from_numpy(labels), ignore_index=0).item()
    assert result.loss == pytest.approx(expected, rel=1e-6)


def test_evaluation_loss_is_the_mean_of_per_batch_means_over_their_pixels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(5, 2, 4)).astype(np.int64)
    logits = torch.from_numpy(rng.normal(size=(5, 3, 2, 4)).astype(np.float32))
    data = _dataset(labels)
    net = Network("fixed", _Fixed(logits), ["m1"])
    result = evaluate(net, data, torch.arange(5), num_classes=3, batch_size=2, chunk_size=4)
    y = torch.from_numpy(labels)
    batches = [F.cross_entropy(logits[i:i + 2], y[i:i + 2], ignore_index=0).item() for i in (0, 2, 4)]
    assert result.loss == pytest.approx(np.mean(batches), rel=1e-6)


def test_dense_kl_is_the_authors_batchmean_divided_by_the_pixels():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    authors = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") / 12 * 16
    assert torch.allclose(softened_kl(s, t, 4.0), authors)
    flat = softened_kl(s.permute(0, 2, 3, 1).reshape(-1, 5), t.permute(0, 2, 3, 1).reshape(-1, 5), 4.0)
    assert torch.allclose(softened_kl(s, t, 4.0), flat)          # the same as every pixel a sample


def test_dense_gate_net_has_the_authors_size_and_routes_per_image():
    gate = DenseGateNet(41, 4)
    assert sum(p.numel() for p in gate.parameters()) == 4596       # spec §4.6
    probs = gate(torch.randn(2, 41, 8, 12))
    assert probs.shape == (2, 4) and torch.allclose(probs.sum(1), torch.ones(2))
    assert isinstance(gate_net_for((41, 8, 12), 4), DenseGateNet) and isinstance(gate_net_for((10,), 4), GateNet)


def test_topk_distillation_gathers_each_images_chosen_teachers_maps():
    torch.manual_seed(0)
    student, teachers = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    gate = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.1, 0.3]])
    loss, chosen = topk_distillation(student, teachers, gate, 2, 4.0)
    assert chosen.tolist() == [[1, 2], [0, 3]]
    first = torch.stack([teachers[0, 1], teachers[1, 0]])
    second = torch.stack([teachers[0, 2], teachers[1, 3]])
    expected = (softened_kl(student, first, 4.0) + softened_kl(student, second, 4.0)) / 2
    assert torch.allclose(loss, expected)
