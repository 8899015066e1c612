"""Stage 3 switched off (paper Table 3, "w/o S3"): every teacher's distillation signal, averaged.

    L = CE(z_s, y) + λ_kd(e) · (1/N) Σ_j T²·KL(p_j ‖ p_s)

with the same λ_kd schedule as dynamic distillation and no GateNet, routing or load balancing. The
teachers are frozen, so their logits are cached per training sample exactly as in stage 3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.base import DistillationMethod, TrainContext
from pipeline.methods.frozen import FrozenOutputs
from pipeline.methods.kd import hinton_kd_loss
from pipeline.methods.mst.dynamic_distillation import LossWeights, Way
from pipeline.models.registry import Network


def averaged_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(1/N) Σ_j T²·KL(p_j^T ‖ p_s^T) over the N teachers of `teacher_logits` (B, N, C), teachers detached."""
    n = teacher_logits.shape[1]
    return sum(hinton_kd_loss(student_logits, teacher_logits[:, j], temperature) for j in range(n)) / n


class AveragedDistillation(DistillationMethod):
    """The "no S3" ablation objective for one student and its N frozen (specialised or plain) teachers."""

    name = "mst_avg"
    teacher_configs = ("mm+cm",)

    def __init__(self, student: Network, ways: Sequence[Way], *, temperature: float, weights: LossWeights,
                 cache: bool = True) -> None:
        super().__init__(student)
        ways = list(ways)
        self.ways = FrozenOutputs(lambda batch: torch.stack([way(batch) for way in ways], dim=1), enabled=cache)
        self.temperature, self.weights = temperature, weights

    def prepare(self, context: TrainContext) -> None:
        self.ways.prepare(context.data, context.split["train"])

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        lambda_kd, _ = self.weights.at(epoch)
        logits = self.student(batch)
        return {"ce": F.cross_entropy(logits, batch["y"]),
                "kd": lambda_kd * averaged_distillation(logits, self.ways(batch), self.temperature)}

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return {"lambda_kd": self.weights.at(epoch)[0]}
