"""The NYU-Depth-V2 networks of the authors' code (official-mst-spec.md §3.5): the FuseNet-I teacher and the
FuseNet RGB / depth branch students, with the authors' module names.

Module names are part of the contract (§4.1, baselines-spec.md §1.8): each `CBRk_*` stage is a top-level
`nn.Sequential` of [Conv 3×3 pad 1 → BN2d → ReLU] blocks, so a hook on it sees that stage's output before
pooling, and sub-module names (`CBR1_RGB_DEC.0`) and state-dict keys follow the authors' layout. Pools,
unpools and dropouts are top-level modules too, named as the authors name them.

`width` multiplies every channel count except the input channels and the classes (width 1 = the paper), so
the same architecture runs on a CPU at e.g. width 1/16. :func:`init_fusenet` reproduces the authors'
initialisation (their VGG16 copy is overwritten, Q12) or, with `init="vgg16"`, keeps the VGG16 encoder convs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.data.validation import DataError
from pipeline.params import ParamsError

# VGG-16 encoder stages (conv output channels) and decoder steps 5..2 (input channels, then conv outputs).
ENCODER_CHANNELS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
DECODER_CHANNELS = {5: (512, 512, 512, 512), 4: (512, 512, 512, 256), 3: (256, 256, 256, 128), 2: (128, 128, 64)}
STAGES = (1, 2, 3, 4, 5)
DROPOUT_STAGES = (3, 4, 5)  # encoder: after pool3..pool5; decoder: after steps 5..3 (the spec's steps 1-3)
INIT_CHOICES = ("authors", "vgg16")
# Indices of the 13 convs in torchvision's `vgg16().features`, in encoder order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_FILE = "vgg16-397923af.pth"


@dataclass(frozen=True)
class _Path:
    """Name patterns (formatted with the stage number) of one encoder or decoder path; `pool` is the
    max-pool of an encoder stage or the max-unpool of a decoder step."""
    cbr: str
    pool: str
    dropout: str


RGB_ENC = _Path("CBR{}_RGB_ENC", "pool{}", "dropout{}")
DEPTH_ENC = _Path("CBR{}_DEPTH_ENC", "pool{}_d", "dropout{}_d")
RGB_DEC = _Path("CBR{}_RGB_DEC", "unpool{}_rgb", "dropout{}_dec_rgb")
D_DEC = _Path("CBR{}_D_DEC", "unpool{}_d", "dropout{}_dec_d")
RGBD_DEC = _Path("CBR{}_RGBD_DEC", "unpool{}", "dropout{}_dec")


def scaled_channels(channels: int, width: float) -> int:
    """A channel count scaled by the width multiplier: max(1, round(channels · width))."""
    return max(1, round(channels * width))


def _cbr(channels: Sequence[int]) -> nn.Sequential:
    """[Conv 3×3 pad 1 → BN2d → ReLU] for each consecutive pair of `channels`."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        # in-place ReLU as the authors: a hook on the Sequential still sees the block output
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out, momentum=0.1),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class _FuseNetBase(nn.Module):
    """Shared construction and forward steps of the FuseNet encoders and decoders."""

    def __init__(self, num_classes: int, width: float, dropout: float) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < float("inf"):
            raise ParamsError(f"fusenet.width: {width!r}; expected a positive number (1 = the paper's FuseNet)")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ParamsError(f"fusenet.dropout: {dropout!r}; expected a probability in [0, 1)")
        if num_classes < 1:
            raise ValueError(f"FuseNet: num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.width = float(width)
        self.encoder_paths: tuple[_Path, ...] = ()

    def _add_encoder(self, path: _Path, in_channels: int, dropout: float, last_pooled: bool) -> None:
        """CBR1..CBR5 with pools 1..4 (and pool5 when `last_pooled`) and dropouts after pools 3..5."""
        c_in = in_channels
        for stage, outs in zip(STAGES, ENCODER_CHANNELS):
            outs = [scaled_channels(c, self.width) for c in outs]
            self.add_module(path.cbr.format(stage), _cbr([c_in, *outs]))
            c_in = outs[-1]
            if stage < 5 or last_pooled:
                self.add_module(path.pool.format(stage), nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True))
                if stage in DROPOUT_STAGES:
                    self.add_module(path.dropout.format(stage), nn.Dropout(p=dropout))
        self.encoder_paths += (path,)

    def _add_decoder(self, path: _Path, dropout: float) -> None:
        """Decoder steps 5..1 (unpool → CBR, dropout after steps 5..3); step 1 ends in a conv to the classes."""
        for stage in reversed(STAGES):
            self.add_module(path.pool.format(stage), nn.MaxUnpool2d(kernel_size=2, stride=2))
            if stage == 1:
                c = scaled_channels(64, self.width)
                # the authors' last block: CBR 64→64 (non-in-place ReLU), then a plain conv to the logits
                block = nn.Sequential(nn.Conv2d(c, c, kernel_size=3, padding=1), nn.BatchNorm2d(c, momentum=0.1),
                                      nn.ReLU(), nn.Conv2d(c, self.num_classes, kernel_size=3, padding=1))
            else:
                block = _cbr([scaled_channels(c, self.width) for c in DECODER_CHANNELS[stage]])
            self.add_module(path.cbr.format(stage), block)
            if stage in DROPOUT_STAGES:
                self.add_module(path.dropout.format(stage), nn.Dropout(p=dropout))

    def _module(self, pattern: str, stage: int) -> nn.Module:
        return getattr(self, pattern.format(stage))

    def _pool(self, path: _Path, stage: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Max-pool with indices, then the dropout that follows pools 3..5."""
        x, indices = self._module(path.pool, stage)(x)
        if stage in DROPOUT_STAGES:
            x = self._module(path.dropout, stage)(x)
        return x, indices

    def _decode(self, path: _Path, x: torch.Tensor, indices: Sequence[torch.Tensor],
                sizes: Sequence[torch.Size]) -> torch.Tensor:
        """Unpool with the encoder's indices back to each pre-pool size, CBR, dropout; returns the logits."""
        for stage in reversed(STAGES):
            x = self._module(path.pool, stage)(x, indices[stage - 1], output_size=sizes[stage - 1])
            x = self._module(path.cbr, stage)(x)
            if stage in DROPOUT_STAGES:
                x = self._module(path.dropout, stage)(x)
        return x


class FuseNetBranch(_FuseNetBase):
    """`FuseNet-RGBbranch` / `FuseNet-Dbranch`: one VGG-16 encoder (dropout after pools 3-5) and its decoder;
    (B,3|1,H,W) -> logits (B,C,H,W). 29,466,665 / 29,465,513 parameters at width 1 and 41 classes."""

    def __init__(self, num_classes: int, modality: str, width: float = 1.0, dropout: float = 0.4) -> None:
        super().__init__(num_classes, width, dropout)
        if modality not in ("rgb", "depth"):
            raise ValueError(f"FuseNetBranch: modality {modality!r}; expected 'rgb' or 'depth'")
        self.modality = modality
        self.encoder_path, self.decoder_path = (RGB_ENC, RGB_DEC) if modality == "rgb" else (DEPTH_ENC, D_DEC)
        self._add_encoder(self.encoder_path, 3 if modality == "rgb" else 1, dropout, last_pooled=True)
        self._add_decoder(self.decoder_path, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for stage in STAGES:
            x = self._module(self.encoder_path.cbr, stage)(x)
            sizes.append(x.shape)
            x, idx = self._pool(self.encoder_path, stage, x)
            indices.append(idx)
        return self._decode(self.decoder_path, x, indices, sizes)


class FuseNetI(_FuseNetBase):
    """`FuseNet-I`, the intermediate-fusion teacher: forward(rgb (B,3,H,W), depth (B,1,H,W)) -> logits (B,C,H,W).

    The depth encoder runs first and keeps its pre-pool stage outputs d1..d5 (stage 5 is not pooled). In the
    RGB encoder each stage output r_k (what a hook on `CBRk_RGB_ENC` sees) is replaced by (r_k + d_k)/2 before
    pool k; dropout follows pools 3-5, then `after_fusion_identity`; the RGBD decoder unpools with the RGB-path
    indices. 44,188,649 parameters at width 1 and 41 classes.
    """

    def __init__(self, num_classes: int, width: float = 1.0, dropout: float = 0.4) -> None:
        super().__init__(num_classes, width, dropout)
        self.after_fusion_identity = nn.Identity()
        self._add_encoder(RGB_ENC, 3, dropout, last_pooled=True)
        # The authors also build pool5_d / dropout5_d here but never call them (and pool stage 3 with
        # pool4_d); pools carry no parameters, so this changes nothing but hook counts on pool modules.
        self._add_encoder(DEPTH_ENC, 1, dropout, last_pooled=False)
        self._add_decoder(RGBD_DEC, dropout)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        depth_stages = []
        x = depth
        for stage in STAGES:
            x = self._module(DEPTH_ENC.cbr, stage)(x)
            depth_stages.append(x)
            if stage < 5:
                x, _ = self._pool(DEPTH_ENC, stage, x)
        indices, sizes = [], []
        y = rgb
        for stage in STAGES:
            y = (self._module(RGB_ENC.cbr, stage)(y) + depth_stages[stage - 1]) / 2
            sizes.append(y.shape)
            y, idx = self._pool(RGB_ENC, stage, y)
            indices.append(idx)
        return self._decode(RGBD_DEC, self.after_fusion_identity(y), indices, sizes)


# ----------------------------------------------------------------------------------------------- initialisation

def vgg16_expected_shapes() -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of torchvision VGG16's 13 convs (`features.{i}.weight/bias`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = 3
    outs = [c for stage in ENCODER_CHANNELS for c in stage]
    for index, c_out in zip(VGG16_CONV_INDICES, outs):
        shapes[f"features.{index}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"features.{index}.bias"] = (c_out,)
        c_in = c_out
    return shapes


def vgg16_conv_mapping(model: nn.Module) -> dict[str, str]:
    """Encoder conv module name -> VGG16 `features.{i}` prefix, for every encoder `model` has."""
    mapping: dict[str, str] = {}
    for path in getattr(model, "encoder_paths", ()):
        names = [f"{path.cbr.format(stage)}.{3 * j}" for stage, outs in zip(STAGES, ENCODER_CHANNELS)
                 for j in range(len(outs))]
        mapping.update({name: f"features.{index}" for name, index in zip(names, VGG16_CONV_INDICES)})
    return mapping


def load_vgg16_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a local torchvision VGG16 state dict (never downloads) and check its 13 conv weights and biases."""
    path = Path(path)
    hint = f"place torchvision's {VGG16_FILE} at {path} or set fusenet vgg16_weights: none"
    if not path.is_file():
        raise DataError(f"{path}: file not found; {hint}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # a truncated or foreign file: name it in one line
        raise DataError(f"{path}: not a readable torch state dict ({type(error).__name__}); {hint}") from None
    if not isinstance(state, Mapping):
        raise DataError(f"{path}: holds a {type(state).__name__}, expected a VGG16 state dict; {hint}")
    for key, shape in vgg16_expected_shapes().items():
        if key not in state:
            raise DataError(f"{path}: key {key!r} missing; expected torchvision VGG16's state dict ({VGG16_FILE})")
        if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise DataError(f"{path}: {key} has shape {got}, expected {shape} (torchvision VGG16, {VGG16_FILE})")
    return dict(state)


@torch.no_grad()
def copy_vgg16(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy VGG16 conv weights and biases into every encoder of `model`; the depth encoder's first kernel is
    the RGB kernel averaged over its 3 input channels (the authors' rule; its bias, which the authors leave
    at PyTorch's default, is VGG16's conv1_1 bias)."""
    modules = dict(model.named_modules())
    for name, prefix in vgg16_conv_mapping(model).items():
        conv = modules[name]
        weight = state[f"{prefix}.weight"]
        if conv.in_channels == 1 and weight.shape[1] == 3:
            weight = weight.mean(dim=1, keepdim=True)
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise ParamsError(f"fusenet.vgg16_weights: {prefix}.weight has shape {tuple(weight.shape)} but "
                              f"{name} needs {tuple(conv.weight.shape)}; VGG16 fits only width 1")
        conv.weight.copy_(weight)
        conv.bias.copy_(state[f"{prefix}.bias"])


@torch.no_grad()
def reinit_like_authors(model: nn.Module, keep: Sequence[nn.Module] = ()) -> None:
    """The authors' `init_net` (xavier, gain 0.02): every Conv2d weight ~ xavier_normal_(gain=0.02), bias 0;
    every BatchNorm2d weight ~ N(1, 0.02), bias 0 — except the convs in `keep`."""
    kept = {id(module) for module in keep}

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d) and id(module) not in kept:
            nn.init.xavier_normal_(module.weight, gain=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    # module registration order follows the authors' constructors, so the RNG draws come in their order
    model.apply(init)


def init_fusenet(model: nn.Module, vgg16_weights: Path | None, init: str) -> nn.Module:
    """Initialise a FuseNet model: copy VGG16 into its encoders when a file is given, then re-initialise as the
    authors' `init_net` does. `init="authors"` re-initialises everything (their VGG16 copy is lost, Q12);
    `init="vgg16"` (FuseNet's intent, needs a file) keeps the copied encoder convs."""
    if init not in INIT_CHOICES:
        raise ParamsError(f"fusenet.init: {init!r}; expected one of {', '.join(map(repr, INIT_CHOICES))}")
    if init == "vgg16" and vgg16_weights is None:
        raise ParamsError("fusenet.init: 'vgg16' keeps VGG16 encoder weights and needs fusenet.vgg16_weights "
                          f"(a path to torchvision's {VGG16_FILE}), got none")
    if vgg16_weights is not None:
        if getattr(model, "width", 1.0) != 1.0:
            raise ParamsError(f"fusenet.width: {model.width} with fusenet.vgg16_weights set; VGG16 can only be "
                              "copied at width 1 (set width: 1 or vgg16_weights: none)")
        copy_vgg16(model, load_vgg16_state(Path(vgg16_weights)))
    if next(model.parameters()).is_meta:
        # built on the meta device only to list module names (params validation in every stage): there are no
        # values to draw, and the draws there cost ~2 s a stage
        return model
    modules = dict(model.named_modules())
    keep = [modules[name] for name in vgg16_conv_mapping(model)] if init == "vgg16" else []
    reinit_like_authors(model, keep)
    return model


# ----------------------------------------------------------------------------------------------- builders

def _check_shapes(arch: str, input_shapes: Sequence[Sequence[int]], channels: Sequence[int]) -> None:
    """Per-sample inputs must be (c, H, W) with the given channels and H, W multiples of 32 (five 2×2 pools)."""
    shapes = [tuple(shape) for shape in input_shapes]
    expected = " and ".join(f"({c}, H, W)" for c in channels)
    ok = len(shapes) == len(channels) and all(
        len(shape) == 3 and shape[0] == c and shape[1] > 0 and shape[2] > 0 and shape[1] % 32 == 0
        and shape[2] % 32 == 0 for shape, c in zip(shapes, channels))
    if ok and len({shape[1:] for shape in shapes}) > 1:
        ok = False
    if not ok:
        raise DataError(f"{arch}: input shapes {shapes}; expected {expected} with the same H, W, both multiples "
                        "of 32 (five 2×2 pools)")


def build_fusenet_i(num_classes: int, input_shapes: Sequence[Sequence[int]], width: float = 1.0,
                    vgg16_weights: Path | None = None, init: str = "authors") -> FuseNetI:
    """`FuseNet-I` for inputs [(3,H,W), (1,H,W)], initialised by :func:`init_fusenet`."""
    _check_shapes("FuseNet-I", input_shapes, (3, 1))
    return init_fusenet(FuseNetI(num_classes, width), vgg16_weights, init)


def build_fusenet_branch(num_classes: int, input_shapes: Sequence[Sequence[int]], modality: str,
                         width: float = 1.0, vgg16_weights: Path | None = None,
                         init: str = "authors") -> FuseNetBranch:
    """`FuseNet-RGBbranch` (modality "rgb", input [(3,H,W)]) or `FuseNet-Dbranch` ("depth", [(1,H,W)]),
    initialised by :func:`init_fusenet`."""
    if modality not in ("rgb", "depth"):
        raise ValueError(f"FuseNetBranch: modality {modality!r}; expected 'rgb' or 'depth'")
    arch = "FuseNet-RGBbranch" if modality == "rgb" else "FuseNet-Dbranch"
    _check_shapes(arch, input_shapes, (3,) if modality == "rgb" else (1,))
    return init_fusenet(FuseNetBranch(num_classes, modality, width), vgg16_weights, init)
