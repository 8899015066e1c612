"""KD (Hinton et al., 2015) as the authors run it (baselines-spec.md §2.2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.methods.common.kl import hinton_kd_loss
from pipeline.models.registry import Network
from pipeline.params import POSITIVE
from pipeline.training.phases import RunContext


@dataclass(frozen=True)
class KDParams:
    """Hinton KD as the authors run it: (1 − α)·CE + α·T²·KL, T = 4, α = 0.5 halved every 30 epochs
    (`alpha`, see AlphaParams; `alpha.schedule: constant` is Hinton's fixed α). `teachers`: the Table 1
    rows run (mm, cm)."""

    teachers: list[str]
    temperature: float = field(metadata=POSITIVE)
    alpha: AlphaParams


@register
class KnowledgeDistillation(DistillationMethod):
    """L = (1 − α)·CE(z_s, y) + α·T²·KL(p_t^T ‖ p_s^T) with a frozen teacher (MM or CM)."""

    name = "kd"
    segmentation = True
    display_name = "KD"
    table_order = 10
    teacher_configs = ("mm", "cm")
    params_type = KDParams

    def __init__(self, student: Network, teacher: Network, temperature: float, alpha: AlphaParams,
                 cache_teacher_outputs: bool = True) -> None:
        super().__init__(student)
        self.teacher = self.freeze(teacher)
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_outputs = FrozenOutputs(self.teacher, enabled=cache_teacher_outputs)

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "KnowledgeDistillation":
        kd = setup.method_params
        return cls(setup.student, setup.teacher, kd.temperature, kd.alpha, setup.cache_frozen_outputs)

    def prepare(self, context: RunContext) -> None:
        self.teacher_outputs.prepare(context.data, context.split["train"])

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        logits = self.student(batch)
        return self.alpha.weigh(epoch, F.cross_entropy(logits, batch["y"]),
                                {"kd": hinton_kd_loss(logits, self.teacher_outputs(batch), self.temperature)})

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.alpha.epoch_values(epoch)
