"""GateNet: the router of MST-Distill's dynamic distillation (paper §3, Eqs. 11–13)."""

from __future__ import annotations

import torch
from torch import nn


class GateNet(nn.Module):
    """Confidences over N specialised teachers from the student's logits: softmax(fc2(fc1(z))).

    fc1: C → 2C and fc2: 2C → N with no activation between them (an affine map; quirk Q18), as in the
    authors' code; 304 parameters for C = 10, N = 4.
    """

    def __init__(self, num_classes: int, num_teachers: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_classes, 2 * num_classes)
        self.fc2 = nn.Linear(2 * num_classes, num_teachers)

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(self.fc1(student_logits)), dim=-1)


class DenseGateNet(nn.Module):
    """Confidences over N specialised teachers from a segmentation student's logits (B, C, H, W), one per
    image: the authors' `GateNet_dense` — 1×1 conv C → 2C, ReLU, depthwise 3×3 stride 2 conv, ReLU, global
    average pool, Linear 2C → N, softmax; 4,596 parameters for C = 41, N = 4."""

    def __init__(self, num_classes: int, num_teachers: int) -> None:
        super().__init__()
        width = 2 * num_classes
        self.expand = nn.Conv2d(num_classes, width, kernel_size=1)
        self.depthwise = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1, groups=width)
        self.fc = nn.Linear(width, num_teachers)

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.depthwise(torch.relu(self.expand(student_logits))))
        return torch.softmax(self.fc(x.mean(dim=(2, 3))), dim=-1)


def gate_net_for(logits_shape: tuple[int, ...], num_teachers: int) -> nn.Module:
    """The authors' router for per-sample logits of shape (C,) (GateNet) or (C, H, W) (GateNet_dense)."""
    return GateNet(logits_shape[0], num_teachers) if len(logits_shape) == 1 else DenseGateNet(logits_shape[0],
                                                                                             num_teachers)
