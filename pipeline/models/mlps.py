"""The CrisisMMD-V2 MLPs of the authors' code (official-mst-spec.md §3.4), with the module names the methods
tap: `fc1`, `fc2` (pre-activation; ReLU is functional) and `fc3` (logits). The fusion MLP's two trunks are
`visual_net` and `textual_net` (their outputs post-ReLU), concatenated **visual first** (the authors' order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Module):
    """fc1 -> ReLU -> fc2 -> ReLU -> fc3."""

    def __init__(self, in_features: int, widths: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, widths[0])
        self.fc2 = nn.Linear(widths[0], widths[1])
        self.fc3 = nn.Linear(widths[1], num_classes)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class UnimodalMLP(MLPHead):
    """`MLP-Vb` (2048 -> 1024 -> 512 -> C, 2,627,080 parameters at C = 8) and `MLP-Tb` (768 -> ..., 1,316,360)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, (1024, 512), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class MLPTrunk(nn.Module):
    """d -> 1024 -> ReLU -> 512 -> ReLU, one modality's trunk inside MLP-I."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, 1024)
        self.linear2 = nn.Linear(1024, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear2(F.relu(self.linear1(x))))


class FusionMLP(MLPHead):
    """`MLP-I` (IntermediateFusionMLP): trunks to 512 each, cat(visual, text) 1024 -> 512 -> 256 -> C;
    4,593,416 parameters at C = 8. `forward(image, text)`."""

    def __init__(self, image_features: int, text_features: int, num_classes: int) -> None:
        super().__init__(1024, (512, 256), num_classes)
        self.visual_net = MLPTrunk(image_features)
        self.textual_net = MLPTrunk(text_features)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.visual_net(image), self.textual_net(text)], dim=1))
