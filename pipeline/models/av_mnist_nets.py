"""The AV-MNIST networks of the authors' code (official-mst-spec.md §3.1), with the same module names.

Module names are part of the contract: methods tap features and insert masks by these names
(`conv3`, `fc1`, `concat_identity`, ...). Activations are applied functionally, so a tap on a conv or
linear module sees its pre-activation output, exactly as in the authors' hooks. The audio nets'
flatten size follows the spectrogram size, so AV-Digits can use smaller spectrograms than 112×112.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5Trunk(nn.Module):
    """LeNet-5 up to its 84-d penultimate layer (post-ReLU), for a (B,1,28,28) image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.flatten_identity = nn.Identity()
        self.fc1 = nn.Linear(120, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        x = self.flatten_identity(torch.flatten(F.relu(self.conv3(x)), 1))
        return F.relu(self.fc1(x))


class LeNet5(LeNet5Trunk):
    """`LeNet5`: the image student (m1) and image cross-modal teacher; 61,706 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(super().forward(x))


class ThreeLayerCNNA(nn.Module):
    """`ThreeLayerCNN-A`: the audio student (m2); 343,562 parameters at 112×112 input."""

    def __init__(self, num_classes: int = 10, spectrogram_size: int = 112) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.conv3_maxpool = nn.Identity()
        self.conv3_maxpool_flatten = nn.Identity()
        side = spectrogram_size // 8
        if side < 1:
            raise ValueError(f"ThreeLayerCNN-A needs spectrograms of at least 8×8, got {spectrogram_size}")
        self.fc1 = nn.Linear(128 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.conv3_maxpool(F.max_pool2d(F.relu(self.conv3(x)), 2))
        return self.fc1(self.conv3_maxpool_flatten(torch.flatten(x, 1)))


class FiveLayerCNNATrunk(nn.Module):
    """The audio trunk of CNN-I: five 3×3 convs (32→512 channels), four max-pools, global average pool."""

    def __init__(self, spectrogram_size: int = 112) -> None:
        super().__init__()
        if spectrogram_size < 16:
            raise ValueError(f"CNN-I's audio trunk needs spectrograms of at least 16×16, got {spectrogram_size}")
        widths = (1, 32, 64, 128, 256, 512)
        for i in range(5):
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return F.adaptive_avg_pool2d(F.relu(_conv3x3_same(self.conv5, x)), 1).flatten(1)


def _conv3x3_same(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a 3×3, stride-1, padding-1 conv. On a 1×1 map (spectrograms below 32×32 reach
    conv5 at 1×1) only the centre tap meets data, so the conv is exactly a linear map by the centre
    weights; computing it that way gives the same output and gradients (the other taps get zero
    gradient either way) and avoids a very slow CPU convolution backward for this shape."""
    if x.shape[-2:] != (1, 1):
        return conv(x)
    return F.linear(x.flatten(1), conv.weight[:, :, 1, 1], conv.bias)[:, :, None, None]


class CNNI(nn.Module):
    """`CNN-I` (IntermediateFusionNet), the multimodal teacher; 1,809,752 parameters.

    The fused vector is [image 84 | audio 512] (image first); fc1 is followed by no activation
    (quirk Q18), as in the authors' code.
    """

    def __init__(self, num_classes: int = 10, spectrogram_size: int = 112) -> None:
        super().__init__()
        self.image_net = LeNet5Trunk()
        self.audio_net = FiveLayerCNNATrunk(spectrogram_size)
        self.concat_identity = nn.Identity()
        self.fc1 = nn.Linear(84 + 512, 298)
        self.fc2 = nn.Linear(298, num_classes)

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        fused = self.concat_identity(torch.cat([self.image_net(image), self.audio_net(audio)], dim=1))
        return self.fc2(self.fc1(fused))
