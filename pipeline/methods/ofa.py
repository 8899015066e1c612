"""OFA, one-for-all KD (Hao et al., NeurIPS 2023), as the authors run it (baselines-spec.md §2.5 and the
OFA row of §3): student taps → projector heads (exits) → OFA loss towards the frozen teacher's logits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.tensors import Batch
from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.common.features import PairTable, check_pair_table, pair_entry, probe_shapes
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.models.registry import Network
from pipeline.models.taps import FeatureTaps
from pipeline.params import POSITIVE
from pipeline.training.phases import RunContext


@dataclass(frozen=True)
class OFAParams:
    """OFA as the authors run it: (1 − α)·CE + α·mean over student taps of OFA(projector(tap), z_t, y),
    ε = 1.1, T = 1, α = 0.5 with the authors' step schedule (`alpha`, see AlphaParams).

    `taps`: per teacher architecture, per student architecture, the student modules whose outputs get a
    projector (4-D outputs: two SepConvs; 2-D: an MLP).
    `eps`: the target exponent ε; authors 1.1 (`--ofa_eps`), the official OFAKD default is 1.0 (its
    examples use 1.0–1.5). Switches (default = authors' main-OFA.py; other value = official OFAKD code):
    - `aggregation`: `mean` over the taps (authors) or `sum` (official);
    - `logit_term`: false (authors) or true (official: the OFA loss on the student's own logits is added).
    The official weights are 1·CE + 1·OFA(logits) + 1·Σ branches: `alpha: {initial: 0.5, schedule: constant}`,
    `aggregation: sum`, `logit_term: true` gives exactly half of that (Adam is almost invariant to the scale).
    Not reproduced: the official projector depth (4 − stage SepConvs ending in max(feat_s, feat_t) channels),
    which is tied to 4-stage ImageNet backbones; the authors' fixed two-SepConv / 2K design is kept."""

    teachers: list[str]
    taps: PairTable[list[str]]
    eps: float = field(metadata=POSITIVE)
    temperature: float = field(metadata=POSITIVE)
    alpha: AlphaParams
    aggregation: Literal["mean", "sum"]
    logit_term: bool

    def validate(self) -> None:
        check_pair_table(self.taps, "taps", lambda names: [("student", name) for name in names])


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, eps: float,
             temperature: float = 1.0) -> torch.Tensor:
    """OFA loss (Hao et al. 2023, Eq. 6; baselines-spec.md §2.5): with p = softmax(z/T) and one-hot y,
    (1/B) Σ_b −Σ_c [(p_t,bc + y_bc)^ε − y_bc] · log p_s,bc. The target adds (1+p_t)^ε − 1 on the label
    class and p_t^ε elsewhere; ε > 1 sharpens it towards the label. The teacher is detached; log p_s is a
    log-softmax (the reference takes log of a softmax, equal up to underflow)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    one_hot = F.one_hot(labels, student_logits.shape[1]).to(p_t.dtype)
    target = (p_t + one_hot).pow(eps) - one_hot
    return -(target * log_p_s).sum(dim=1).mean()


class SepConv(nn.Sequential):
    """Separable conv block of OFA (and DARTS): depthwise 3×3 (stride), pointwise 1×1, BN, ReLU,
    depthwise 3×3, pointwise 1×1, BN, ReLU; no biases. Halves H and W with stride 2 (1×1 stays 1×1)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_in, 3, stride=stride, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_in, 1, bias=False),
            nn.BatchNorm2d(channels_in),
            nn.ReLU(),
            nn.Conv2d(channels_in, channels_in, 3, stride=1, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
        )


def conv_projector(channels: int, num_classes: int) -> nn.Sequential:
    """The authors' 2-D exit: SepConv(C→2C, s2), SepConv(2C→2K, s2), global average pool, Linear(2K→K)."""
    hidden = 2 * num_classes
    return nn.Sequential(SepConv(channels, 2 * channels), SepConv(2 * channels, hidden),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))


def mlp_projector(dim: int, num_classes: int) -> nn.Sequential:
    """The authors' 1-D exit: Linear(d→2K), ReLU, Linear(2K→K)."""
    hidden = 2 * num_classes
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def init_projector(module: nn.Module) -> None:
    """OFA's initialisation: convs Kaiming-normal (fan_out, ReLU); BN weight 1, bias 0; Linear weights
    truncated normal (std 0.02, cut at ±2 like timm's trunc_normal_), zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_projector(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """An initialised exit for a tap whose per-sample output shape is `feature_shape`: (C, H, W) → conv
    projector, (d,) → MLP projector."""
    if len(feature_shape) == 3:
        projector = conv_projector(feature_shape[0], num_classes)
    elif len(feature_shape) == 1:
        projector = mlp_projector(feature_shape[0], num_classes)
    else:
        raise ValueError(f"OFA projectors take (C, H, W) or (d,) features per sample, got shape "
                         f"{tuple(feature_shape)}")
    init_projector(projector)
    return projector


@register
class OneForAll(DistillationMethod):
    """L = (1 − α)·CE(z_s, y) + α·[agg over taps i of OFA(proj_i(f_i), z_t, y) (+ OFA(z_s, z_t, y))], with a
    frozen teacher (MM or CM) and one trainable projector per student tap, optimised with the student."""

    name = "ofa"
    display_name = "OFA"
    table_order = 40
    teacher_configs = ("mm", "cm")
    params_type = OFAParams

    def __init__(self, student: Network, teacher: Network, taps: list[str], projectors: list[nn.Module],
                 eps: float, temperature: float, alpha: AlphaParams, aggregation: str = "mean",
                 logit_term: bool = False, cache_teacher_outputs: bool = True) -> None:
        super().__init__(student)
        if len(taps) != len(projectors) or not taps:
            raise ValueError(f"OFA needs one projector per tap, got {len(taps)} taps and {len(projectors)} projectors")
        if aggregation not in ("mean", "sum"):
            raise ValueError(f"unknown OFA aggregation {aggregation!r}; expected 'mean' or 'sum'")
        self.teacher = self.freeze(teacher)
        self.taps = list(taps)
        self.projectors = nn.ModuleList(projectors)
        self.eps = eps
        self.temperature = temperature
        self.alpha = alpha
        self.aggregation = aggregation
        self.logit_term = logit_term
        # the teacher's logits (its last FC output) are a fixed function of the sample: frozen, eval, no augmentation
        self.teacher_outputs = FrozenOutputs(self.teacher, enabled=cache_teacher_outputs)

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "OneForAll":
        p = setup.method_params
        taps = pair_entry(p.taps, setup.teacher, setup.student, "ofa.taps")
        shapes = probe_shapes(setup.student, taps, setup.sample)
        projectors = [build_projector(shapes[name], setup.num_classes) for name in taps]
        return cls(setup.student, setup.teacher, taps, projectors, p.eps, p.temperature, p.alpha, p.aggregation,
                   p.logit_term, setup.cache_frozen_outputs)

    def prepare(self, context: RunContext) -> None:
        self.teacher_outputs.prepare(context.data, context.split["train"])

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        with FeatureTaps(self.student.body, self.taps) as recorded:
            logits = self.student(batch)
        teacher_logits = self.teacher_outputs(batch)
        labels = batch["y"]
        branches = torch.stack([ofa_loss(projector(recorded[name]), teacher_logits, labels, self.eps,
                                         self.temperature)
                                for name, projector in zip(self.taps, self.projectors)])
        branch_loss = branches.mean() if self.aggregation == "mean" else branches.sum()
        terms = {"ofa": branch_loss}
        if self.logit_term:
            terms["ofa_logits"] = ofa_loss(logits, teacher_logits, labels, self.eps, self.temperature)
        return self.alpha.weigh(epoch, F.cross_entropy(logits, labels), terms)

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.alpha.epoch_values(epoch)
