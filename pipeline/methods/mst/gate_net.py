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
