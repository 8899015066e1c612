"""MaskNets: soft feature masks that turn a frozen teacher into a specialised teacher (paper Eq. 6).

A MaskNet reads a feature x of a hooked layer and returns m(x) ∈ (0,1) of the same width; the hooked
layer's output is replaced by m(x) ⊙ x and flows on through the frozen network. As in the authors'
`MaskNet_1d`, each of the D feature dimensions becomes one token: a linear projector maps x to D tokens
of width h, multi-head self-attention mixes the tokens, a linear layer and a sigmoid give one mask
value per dimension. Feature maps are first reduced to a C-vector (`MaskNet_2d`: depthwise 3×3
stride-2 conv, pointwise conv, BatchNorm, ReLU, global average pool) and masked channel-wise.
"""

from __future__ import annotations

import torch
from torch import nn


def hidden_width(dim: int, hidden_factor: float, heads: int) -> int:
    """Token width h = ⌊D / (factor · heads)⌋ · heads (a multiple of the head count, as the authors), at
    least `heads`: with a large factor on a narrow layer the authors' formula gives 0, which cannot run."""
    return max(heads, int(dim // (hidden_factor * heads)) * heads)


class MaskNet1d(nn.Module):
    """Mask for a (B, D) feature: projector D → D tokens × h, self-attention, linear h → 1, sigmoid."""

    def __init__(self, dim: int, hidden_factor: float = 2.0, heads: int = 3) -> None:
        super().__init__()
        self.dim = dim
        self.width = hidden_width(dim, hidden_factor, heads)
        self.embed = nn.Linear(dim, dim * self.width)
        self.mha = nn.MultiheadAttention(self.width, heads, batch_first=True)
        self.fc = nn.Linear(self.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).view(x.shape[0], self.dim, self.width)
        mixed, _ = self.mha(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.fc(mixed).squeeze(-1))


class SpatialReduction(nn.Module):
    """(B, C, H, W) → (B, C): depthwise 3×3 stride 2, pointwise 1×1, BatchNorm, ReLU, global average pool."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.pointwise(self.depthwise(x)))).mean(dim=(2, 3))


class MaskNet2d(nn.Module):
    """Channel mask for a (B, C, H, W) feature map: SpatialReduction, then a MaskNet1d over C."""

    def __init__(self, channels: int, hidden_factor: float = 2.0, heads: int = 3) -> None:
        super().__init__()
        self.spatial_reduce = SpatialReduction(channels)
        self.mask = MaskNet1d(channels, hidden_factor, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask(self.spatial_reduce(x))


def mask_net_for(feature_shape: tuple[int, ...], hidden_factor: float = 2.0, heads: int = 3) -> nn.Module:
    """The authors' choice by per-sample feature shape: (D,) or (C,1,1) → MaskNet1d; (C,H,W) → MaskNet2d."""
    if len(feature_shape) == 1:
        return MaskNet1d(feature_shape[0], hidden_factor, heads)
    if len(feature_shape) == 3 and tuple(feature_shape[1:]) == (1, 1):
        return MaskNet1d(feature_shape[0], hidden_factor, heads)
    if len(feature_shape) == 3:
        return MaskNet2d(feature_shape[0], hidden_factor, heads)
    raise ValueError(f"no MaskNet for a feature of per-sample shape {tuple(feature_shape)}; expected (D,) or (C,H,W)")


def apply_mask(mask_net: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """mask ⊙ output for a hooked layer's output (official-mst-spec.md §4.2): a (B,C,1,1) output is
    squeezed to (B,C) for its MaskNet; a (B,C,H,W) map gets a (B,C,1,1) channel mask. The authors' hook
    returns the squeezed tensor, which only a following flatten tolerates (LeNet5's conv3); the masked output
    keeps the layer's shape here, the same values for a flatten and what a FuseNet decoder unpooling a 1×1
    bottleneck (32-pixel inputs) needs."""
    shape = output.shape
    if output.dim() == 4 and output.shape[-2:] == (1, 1):
        output = output.flatten(1)
    mask = mask_net(output)
    while mask.dim() < output.dim():
        mask = mask.unsqueeze(-1)
    return (mask * output).reshape(shape)
