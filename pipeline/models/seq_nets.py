"""The RAVDESS and VGGSound-50k networks of the authors' code (official-mst-spec.md §3.2–3.3), with the
module names the methods tap (baselines-spec.md §1.8): `visual_branch`, `audio_branch` (the flattened conv
trunks), `fc1`, `fc2` (pre-activation: ReLU is applied functionally, as in the authors' hooks) and `fc3`
(logits).

Inputs arrive in the prepared layout and are permuted inside `forward`, where the authors use a wrapper:
RAVDESS video (B,15,3,H,W) -> (B,3,15,H,W); VGGSound visual features (B,10,7,7,512) -> (B,512,10,7,7). Audio
is fed as is (MFCC or segment channels over time). The flatten sizes follow the input shapes (the authors hard-
wire 224×224×15 frames, 156 MFCC steps and 10×7×7 maps; at those shapes every parameter count equals the
spec's), so a test can run the same architecture on smaller inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_out(size: int, pools: int, kernel: int) -> int:
    """Length of an axis after `pools` floor max-pools of `kernel` (padding-1 convs keep sizes)."""
    for _ in range(pools):
        size //= kernel
    return size


class ConvTrunk(nn.Module):
    """Conv (k3, pad 1) -> BatchNorm -> ReLU -> MaxPool blocks, flattened; `pooled` says which blocks pool."""

    def __init__(self, dims: int, widths: Sequence[int], pool: int, pooled: Sequence[bool]) -> None:
        super().__init__()
        conv, norm = {3: (nn.Conv3d, nn.BatchNorm3d), 1: (nn.Conv1d, nn.BatchNorm1d)}[dims]
        self.pool = {3: F.max_pool3d, 1: F.max_pool1d}[dims]
        self.kernel = pool
        self.pooled = tuple(pooled)
        for i in range(len(widths) - 1):
            setattr(self, f"conv{i + 1}", conv(widths[i], widths[i + 1], kernel_size=3, padding=1))
            setattr(self, f"bn{i + 1}", norm(widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, pooled in enumerate(self.pooled, start=1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if pooled:
                x = self.pool(x, self.kernel)
        return torch.flatten(x, 1)


class RavdessVisualBranch(ConvTrunk):
    """VisualBranch: Conv3d 3->6->12->24, each BN3d, ReLU, MaxPool3d 2; (B,3,15,224,224) -> 24·1·28·28 = 18,816."""

    def __init__(self, frames: int = 15, size: tuple[int, int] = (224, 224)) -> None:
        super().__init__(3, (3, 6, 12, 24), pool=2, pooled=(True, True, True))
        self.out_features = 24 * _conv_out(frames, 3, 2) * _conv_out(size[0], 3, 2) * _conv_out(size[1], 3, 2)


class RavdessAudioBranch(ConvTrunk):
    """AudioBranch: Conv1d 15->32->128->256, each BN1d, ReLU, MaxPool1d 3; (B,15,156) -> 256·5 = 1,280."""

    def __init__(self, mfcc: int = 15, steps: int = 156) -> None:
        super().__init__(1, (mfcc, 32, 128, 256), pool=3, pooled=(True, True, True))
        self.out_features = 256 * _conv_out(steps, 3, 3)


class VggsVisualBranch(ConvTrunk):
    """VisualBranch (VGGS): Conv3d 512->256->128->64, BN3d, ReLU, MaxPool3d 2 after the first two;
    (B,512,10,7,7) -> 64·2·1·1 = 128."""

    def __init__(self, segments: int = 10, size: tuple[int, int] = (7, 7), channels: int = 512) -> None:
        super().__init__(3, (channels, 256, 128, 64), pool=2, pooled=(True, True, False))
        self.out_features = 64 * _conv_out(segments, 2, 2) * _conv_out(size[0], 2, 2) * _conv_out(size[1], 2, 2)


class VggsAudioBranch(ConvTrunk):
    """AudioBranch (VGGS): Conv1d 10->16->32->64, BN1d, ReLU, MaxPool1d 3; (B,10,128) -> 64·4 = 256."""

    def __init__(self, segments: int = 10, dims: int = 128) -> None:
        super().__init__(1, (segments, 16, 32, 64), pool=3, pooled=(True, True, True))
        self.out_features = 64 * _conv_out(dims, 3, 3)


class ClassifierHead(nn.Module):
    """fc1 (-> 320, ReLU) -> fc2 (-> 160, ReLU) -> fc3 (logits), the head every RAVDESS/VGGS net shares."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 320)
        self.fc2 = nn.Linear(320, 160)
        self.fc3 = nn.Linear(160, num_classes)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _video_first(x: torch.Tensor) -> torch.Tensor:
    """RAVDESS video (B,T,C,H,W) -> (B,C,T,H,W), the authors' wrapper permute."""
    return x.permute(0, 2, 1, 3, 4)


def _features_first(x: torch.Tensor) -> torch.Tensor:
    """VGGSound visual features (B,T,H,W,C) -> (B,C,T,H,W), the authors' wrapper permute."""
    return x.permute(0, 4, 1, 2, 3)


class BranchNet(ClassifierHead):
    """A unimodal branch net: one trunk (`visual_branch` or `audio_branch`) and the head."""

    def __init__(self, name: str, trunk: ConvTrunk, num_classes: int, permute=None) -> None:
        super().__init__(trunk.out_features, num_classes)
        self.branch_name = name
        self.add_module(name, trunk)
        self.permute = permute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.permute is not None:
            x = self.permute(x)
        return self.head(getattr(self, self.branch_name)(x))


class DualStreamNet(ClassifierHead):
    """DSCNN-I / DSCNN-VGGS-I: both trunks, concatenated **audio first** (the authors' order), then the head.
    `forward(visual, audio)`."""

    def __init__(self, visual: ConvTrunk, audio: ConvTrunk, num_classes: int, permute) -> None:
        super().__init__(audio.out_features + visual.out_features, num_classes)
        self.visual_branch = visual
        self.audio_branch = audio
        self.permute = permute

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        fused = torch.cat([self.audio_branch(audio), self.visual_branch(self.permute(visual))], dim=1)
        return self.head(fused)


def ravdess_visual_net(num_classes: int, video_shape: Sequence[int]) -> BranchNet:
    """`VisualBranchNet` on (15,3,224,224) video: 6,084,420 parameters."""
    frames, _, height, width = video_shape
    return BranchNet("visual_branch", RavdessVisualBranch(frames, (height, width)), num_classes, _video_first)


def ravdess_audio_net(num_classes: int, mfcc_shape: Sequence[int]) -> BranchNet:
    """`AudioBranchNet` on (15,156) MFCCs: 575,848 parameters."""
    return BranchNet("audio_branch", RavdessAudioBranch(*mfcc_shape), num_classes)


def dscnn_i(num_classes: int, video_shape: Sequence[int], mfcc_shape: Sequence[int]) -> DualStreamNet:
    """`DSCNN-I` (DualStreamCNN), the RAVDESS multimodal teacher: 6,607,300 parameters."""
    frames, _, height, width = video_shape
    return DualStreamNet(RavdessVisualBranch(frames, (height, width)), RavdessAudioBranch(*mfcc_shape), num_classes,
                         _video_first)


def vggs_visual_net(num_classes: int, feature_shape: Sequence[int]) -> BranchNet:
    """`VisualBranchNet-VGGS` on (10,7,7,512) VGG19 maps: 4,761,549 parameters (141 classes)."""
    segments, height, width, channels = feature_shape
    return BranchNet("visual_branch", VggsVisualBranch(segments, (height, width), channels), num_classes,
                     _features_first)


def vggs_audio_net(num_classes: int, feature_shape: Sequence[int]) -> BranchNet:
    """`AudioBranchNet-VGGS` on (10,128) VGGish embeddings: 164,797 parameters (141 classes)."""
    return BranchNet("audio_branch", VggsAudioBranch(*feature_shape), num_classes)


def dscnn_vggs_i(num_classes: int, visual_shape: Sequence[int], audio_shape: Sequence[int]) -> DualStreamNet:
    """`DSCNN-VGGS-I`, the VGGSound multimodal teacher: 4,851,965 parameters (141 classes)."""
    segments, height, width, channels = visual_shape
    return DualStreamNet(VggsVisualBranch(segments, (height, width), channels), VggsAudioBranch(*audio_shape),
                         num_classes, _features_first)
