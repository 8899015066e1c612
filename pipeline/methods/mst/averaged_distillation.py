"""Phase 3 switched off (paper Table 3, "w/o S3"): every teacher's distillation signal, averaged.

    L = CE(z_s, y) + λ_kd(e) · (1/N) Σ_j T²·KL(p_j ‖ p_s)

with the same λ_kd schedule as dynamic distillation and no GateNet, routing or load balancing. The
teachers are frozen, so their logits are cached per training sample exactly as in phase 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.tensors import Batch
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.methods.common.kl import hinton_kd_loss
from pipeline.methods.mst.dynamic_distillation import LossWeights, Specialist
from pipeline.training.phases import RunContext


def averaged_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(1/N) Σ_j T²·KL(p_j^T ‖ p_s^T) over the N teachers of `teacher_logits` (B, N, C), teachers detached."""
    n = teacher_logits.shape[1]
    return sum(hinton_kd_loss(student_logits, teacher_logits[:, j], temperature) for j in range(n)) / n


class AveragedDistillation(nn.Module):
    """The "no S3" objective given a student's logits and its N frozen (specialised or plain) teachers."""

    def __init__(self, specialists: Sequence[Specialist], *, temperature: float, weights: LossWeights,
                 cache: bool = True) -> None:
        super().__init__()
        specialists = list(specialists)
        self.specialists = FrozenOutputs(lambda batch: torch.stack([s(batch) for s in specialists], dim=1),
                                         enabled=cache)
        self.temperature, self.weights = temperature, weights

    def prepare(self, context: RunContext) -> None:
        self.specialists.prepare(context.data, context.split["train"])

    def terms(self, logits: torch.Tensor, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        lambda_kd, _ = self.weights.at(epoch)
        return {"ce": F.cross_entropy(logits, batch["y"]),
                "kd": lambda_kd * averaged_distillation(logits, self.specialists(batch), self.temperature)}

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return {"lambda_kd": self.weights.at(epoch)[0]}
