"""The datasets the benchmark knows: modalities, classes, networks and how their raw files load.

Dataset keys are spelled the same everywhere: `av_digits`, `av_mnist`, `ravdess`, `vggsound50k`, `crisismmd_v2`
(classification, Table 1) and `rgbd_digits`, `nyu_depth_v2` (semantic segmentation, Table 2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import crisismmd, nyu_depth_v2, ravdess, vggsound
from pipeline.data.av_mnist import load_av_mnist


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    display_name: str
    modalities: dict[str, str]            # batch key -> modality name, e.g. {"m1": "image", "m2": "audio"}
    num_classes: int
    networks: dict[str, str]              # "mm" (multimodal teacher), "m1", "m2" -> architecture name
    load: Callable[[Path, Any], dict[str, np.ndarray]]   # (raw folder, params blocks) -> m1, m2, labels
    raw_layout: str                       # what a user must place in the raw folder
    in_paper: bool = True                 # False: not a dataset of the paper (no published numbers)
    groups: str | None = None             # what the loader's `groups` are (e.g. "actor"), for disjoint splits
    task: str = "classification"          # or "segmentation": labels are (H, W) maps, outputs (C, H, W) logits
    ignore_label: int | None = None       # the class no loss or metric counts (segmentation void)

    @property
    def label_ndim(self) -> int:
        """Dimensions of one sample's label: 0 (a class) or 2 (an H×W map)."""
        return 2 if self.task == "segmentation" else 0

    def modality_name(self, key: str) -> str:
        return "multimodal" if key == "mm" else self.modalities[key]

    @staticmethod
    def other(target: str) -> str:
        """The other modality's batch key: m1 <-> m2."""
        return {"m1": "m2", "m2": "m1"}[target]


AV_MNIST_LAYOUT = ("image/{train,test}_data.npy (N×784), audio/{train,test}_data.npy (N×S×S), "
                   "{train,test}_labels.npy (N,) — MultiBench's avmnist archive")

DATASETS: dict[str, DatasetSpec] = {
    "av_digits": DatasetSpec(
        key="av_digits", display_name="AV-Digits", modalities={"m1": "image", "m2": "audio"}, num_classes=10,
        networks={"mm": "cnn_i", "m1": "lenet5", "m2": "three_layer_cnn_a"},
        load=lambda root, blocks: load_av_mnist(root, blocks["av_digits"].spectrogram_size), in_paper=False,
        raw_layout=AV_MNIST_LAYOUT + ", built by the build_av_digits stage"),
    "av_mnist": DatasetSpec(
        key="av_mnist", display_name="AV-MNIST", modalities={"m1": "image", "m2": "audio"}, num_classes=10,
        networks={"mm": "cnn_i", "m1": "lenet5", "m2": "three_layer_cnn_a"},
        load=lambda root, blocks: load_av_mnist(root, 112),
        raw_layout=AV_MNIST_LAYOUT + " with S = 112"),
    "ravdess": DatasetSpec(
        key="ravdess", display_name="RAVDESS", modalities={"m1": "visual", "m2": "audio"}, num_classes=8,
        networks={"mm": "dscnn_i", "m1": "visual_branch_net", "m2": "audio_branch_net"},
        load=lambda root, blocks: ravdess.load(root), raw_layout=ravdess.LAYOUT, groups="actor"),
    "vggsound50k": DatasetSpec(
        key="vggsound50k", display_name="VGGSound-50k", modalities={"m1": "visual", "m2": "audio"}, num_classes=141,
        networks={"mm": "dscnn_vggs_i", "m1": "visual_branch_net_vggs", "m2": "audio_branch_net_vggs"},
        load=lambda root, blocks: vggsound.load(root), raw_layout=vggsound.LAYOUT),
    "crisismmd_v2": DatasetSpec(
        key="crisismmd_v2", display_name="CrisisMMD-V2", modalities={"m1": "image", "m2": "text"}, num_classes=8,
        networks={"mm": "mlp_i", "m1": "mlp_vb", "m2": "mlp_tb"},
        load=lambda root, blocks: crisismmd.load(root), raw_layout=crisismmd.LAYOUT),
    # semantic segmentation (Table 2): 40 classes + void (0), FuseNet (official-mst-spec.md §2.5, §3.5)
    "nyu_depth_v2": DatasetSpec(
        key="nyu_depth_v2", display_name="NYU-Depth-V2", modalities={"m1": "rgb", "m2": "depth"}, num_classes=41,
        networks={"mm": "fusenet_i", "m1": "fusenet_rgb_branch", "m2": "fusenet_depth_branch"},
        load=lambda root, blocks: nyu_depth_v2.load(root, num_classes=41), raw_layout=nyu_depth_v2.LAYOUT,
        task="segmentation", ignore_label=0),
    "rgbd_digits": DatasetSpec(
        key="rgbd_digits", display_name="RGB-D Digits", modalities={"m1": "rgb", "m2": "depth"}, num_classes=12,
        networks={"mm": "fusenet_i", "m1": "fusenet_rgb_branch", "m2": "fusenet_depth_branch"},
        load=lambda root, blocks: nyu_depth_v2.load(root, num_classes=12), in_paper=False,
        raw_layout=nyu_depth_v2.LAYOUT + ", built by the build_rgbd_digits stage", task="segmentation",
        ignore_label=0),
}


@dataclass(frozen=True)
class SegmentationParams:
    """The `segmentation` params block: the semantic-segmentation datasets (Table 2; key -> folder the prepare
    stage reads) and the baselines their distill stages run (those of the paper's Table 2)."""

    datasets: dict[str, str]
    methods: list[str]


def dataset_spec(key: str) -> DatasetSpec:
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {key!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[key]
