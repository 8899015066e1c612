"""Networks by name, wrapped so that every network takes the same batch mapping.

A :class:`Network` knows which batch keys it reads (`("m1",)`, `("m2",)` or `("m1", "m2")`), so a
training loop or a method calls `net(batch)` whatever the modality set. Architecture options (FuseNet's
`width`, `init`, `vgg16_weights`, from the `fusenet` params block) reach the builders that take them; the
structural ones (`width`) are kept on the network, so that a checkpoint rebuilds the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.models.av_mnist_nets import CNNI, LeNet5, ThreeLayerCNNA
from pipeline.models.fusenet import build_fusenet_branch, build_fusenet_i
from pipeline.models.mlps import FusionMLP, UnimodalMLP
from pipeline.models.seq_nets import (dscnn_i, dscnn_vggs_i, ravdess_audio_net, ravdess_visual_net, vggs_audio_net,
                                      vggs_visual_net)

Options = Mapping[str, Any]
# name -> constructor(num_classes, input_shapes) where input_shapes are per-sample shapes of the inputs read
_BUILDERS: dict[str, Callable[[int, Sequence[tuple[int, ...]]], nn.Module]] = {
    "lenet5": lambda c, shapes: LeNet5(c),
    "three_layer_cnn_a": lambda c, shapes: ThreeLayerCNNA(c, spectrogram_size=shapes[0][-1]),
    "cnn_i": lambda c, shapes: CNNI(c, spectrogram_size=shapes[1][-1]),
    # RAVDESS (official-mst-spec.md §3.2): video (15,3,224,224), MFCC (15,156)
    "visual_branch_net": lambda c, shapes: ravdess_visual_net(c, shapes[0]),
    "audio_branch_net": lambda c, shapes: ravdess_audio_net(c, shapes[0]),
    "dscnn_i": lambda c, shapes: dscnn_i(c, shapes[0], shapes[1]),
    # VGGSound-50k (§3.3): VGG19 pool5 maps (10,7,7,512), VGGish embeddings (10,128)
    "visual_branch_net_vggs": lambda c, shapes: vggs_visual_net(c, shapes[0]),
    "audio_branch_net_vggs": lambda c, shapes: vggs_audio_net(c, shapes[0]),
    "dscnn_vggs_i": lambda c, shapes: dscnn_vggs_i(c, shapes[0], shapes[1]),
    # CrisisMMD-V2 (§3.4): ResNet-50 features (2048,), BERTweet pooler features (768,)
    "mlp_vb": lambda c, shapes: UnimodalMLP(shapes[0][0], c),
    "mlp_tb": lambda c, shapes: UnimodalMLP(shapes[0][0], c),
    "mlp_i": lambda c, shapes: FusionMLP(shapes[0][0], shapes[1][0], c),
}
# Architectures with options: name -> constructor(num_classes, input_shapes, options).
_OPTION_BUILDERS: dict[str, Callable[[int, Sequence[tuple[int, ...]], Options], nn.Module]] = {
    # NYU-Depth-V2 (§3.5): RGB (3,H,W), depth (1,H,W); H and W multiples of 32
    "fusenet_rgb_branch": lambda c, shapes, o: build_fusenet_branch(c, shapes, "rgb", **o),
    "fusenet_depth_branch": lambda c, shapes, o: build_fusenet_branch(c, shapes, "depth", **o),
    "fusenet_i": lambda c, shapes, o: build_fusenet_i(c, shapes, **o),
}
STRUCTURAL_OPTIONS = ("width",)   # options that change parameter shapes (kept in checkpoints)


# The names the authors' code and the paper use for each architecture.
DISPLAY_NAMES = {"lenet5": "LeNet5", "three_layer_cnn_a": "ThreeLayerCNN-A", "cnn_i": "CNN-I",
                 "visual_branch_net": "VisualBranchNet", "audio_branch_net": "AudioBranchNet", "dscnn_i": "DSCNN-I",
                 "visual_branch_net_vggs": "VisualBranchNet-VGGS", "audio_branch_net_vggs": "AudioBranchNet-VGGS",
                 "dscnn_vggs_i": "DSCNN-VGGS-I", "mlp_vb": "MLP-Vb", "mlp_tb": "MLP-Tb", "mlp_i": "MLP-I",
                 "fusenet_i": "FuseNet-I", "fusenet_rgb_branch": "FuseNet-RGBbranch",
                 "fusenet_depth_branch": "FuseNet-Dbranch"}


class Network(nn.Module):
    """A named architecture plus the batch keys it reads; `forward(batch)` returns logits."""

    def __init__(self, arch: str, body: nn.Module, inputs: Sequence[str], structure: Options | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.inputs = tuple(inputs)
        self.body = body
        self.structure = dict(structure or {})   # the structural options it was built with (e.g. width)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.body(*(batch[key] for key in self.inputs))


def available_architectures() -> list[str]:
    return sorted([*_BUILDERS, *_OPTION_BUILDERS])


def takes_options(arch: str) -> bool:
    return arch in _OPTION_BUILDERS


def build_network(arch: str, inputs: Sequence[str], num_classes: int, input_shapes: Sequence[tuple[int, ...]],
                  options: Options | None = None) -> Network:
    """Build architecture `arch` (freshly initialised from the current torch RNG state); `options` go to an
    architecture that takes them and are ignored by the others."""
    if arch not in _BUILDERS and arch not in _OPTION_BUILDERS:
        raise KeyError(f"unknown architecture {arch!r}; available: {', '.join(available_architectures())}")
    if len(inputs) != len(input_shapes):
        raise ValueError(f"{arch}: {len(inputs)} inputs but {len(input_shapes)} input shapes")
    if arch in _BUILDERS:
        return Network(arch, _BUILDERS[arch](num_classes, list(input_shapes)), inputs)
    options = dict(options or {})
    body = _OPTION_BUILDERS[arch](num_classes, list(input_shapes), options)
    return Network(arch, body, inputs, {k: options[k] for k in STRUCTURAL_OPTIONS if k in options})


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Per-sample input shapes used only to enumerate module names (names do not depend on input sizes).
_PROBE_SHAPES = {"lenet5": [(1, 28, 28)], "three_layer_cnn_a": [(1, 16, 16)], "cnn_i": [(1, 28, 28), (1, 16, 16)],
                 "visual_branch_net": [(15, 3, 224, 224)], "audio_branch_net": [(15, 156)],
                 "dscnn_i": [(15, 3, 224, 224), (15, 156)], "visual_branch_net_vggs": [(10, 7, 7, 512)],
                 "audio_branch_net_vggs": [(10, 128)], "dscnn_vggs_i": [(10, 7, 7, 512), (10, 128)],
                 "mlp_vb": [(2048,)], "mlp_tb": [(768,)], "mlp_i": [(2048,), (768,)],
                 "fusenet_rgb_branch": [(3, 32, 32)], "fusenet_depth_branch": [(1, 32, 32)],
                 "fusenet_i": [(3, 32, 32), (1, 32, 32)]}


def module_names(arch: str) -> list[str]:
    """Names of the submodules of architecture `arch`'s body (what taps and hooks may name), without
    allocating weights."""
    if arch not in _NAMES_CACHE:
        if arch not in _PROBE_SHAPES:
            raise KeyError(f"unknown architecture {arch!r}; available: {', '.join(available_architectures())}")
        with torch.device("meta"):
            body = build_network(arch, ["m1"] * len(_PROBE_SHAPES[arch]), 10, _PROBE_SHAPES[arch]).body
        _NAMES_CACHE[arch] = [name for name, _ in body.named_modules() if name]
    return _NAMES_CACHE[arch]


_NAMES_CACHE: dict[str, list[str]] = {}
