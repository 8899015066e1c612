"""KD (Hinton et al., 2015) as the authors run it (baselines-spec.md §2.2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch, DeviceDataset
from pipeline.methods.base import DistillationMethod, register
from pipeline.methods.frozen import FrozenOutputs
from pipeline.models.registry import Network


def softened_kl(learner_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · (1/B) Σ_b KL(softmax(z_target,b / T) ‖ softmax(z_learner,b / T)), gradients to both sides.
    `batchmean` sums over classes and averages over the batch; T² keeps gradient magnitudes as T grows."""
    log_p_learner = F.log_softmax(learner_logits / temperature, dim=1)
    p_target = F.softmax(target_logits / temperature, dim=1)
    return F.kl_div(log_p_learner, p_target, reduction="batchmean") * temperature**2


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_t^T ‖ p_s^T) with the teacher detached — Hinton et al. 2015, Eq. 2 scaled by T²."""
    return softened_kl(student_logits, teacher_logits.detach(), temperature)


@dataclass(frozen=True)
class AlphaSchedule:
    """α for each epoch. `authors_step`: α₀ halved after every `decay_every` epochs (the authors'
    main-KD.py: 0.5 for epochs 1–30, 0.25 for 31–60, …); `constant`: α₀ throughout (Hinton's KD)."""

    initial: float
    kind: str = "authors_step"
    decay_every: int = 30
    decay_factor: float = 0.5

    def __call__(self, epoch: int) -> float:
        """α during 0-based `epoch`."""
        if self.kind == "constant":
            return self.initial
        return self.initial * self.decay_factor ** (epoch // self.decay_every)


@register
class KnowledgeDistillation(DistillationMethod):
    """L = (1 − α)·CE(z_s, y) + α·T²·KL(p_t^T ‖ p_s^T) with a frozen teacher (MM or CM)."""

    name = "kd"
    teacher_configs = ("mm", "cm")

    def __init__(self, student: Network, teacher: Network, temperature: float, alpha: AlphaSchedule,
                 cache_teacher_outputs: bool = True) -> None:
        super().__init__(student)
        self.teacher = self.freeze(teacher)
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_outputs = FrozenOutputs(self.teacher, enabled=cache_teacher_outputs)

    @classmethod
    def from_params(cls, student: Network, teacher: Network | None, params: Any) -> "KnowledgeDistillation":
        kd = params.kd
        schedule = AlphaSchedule(kd.alpha, kd.alpha_schedule, kd.alpha_decay_every, kd.alpha_decay_factor)
        return cls(student, teacher, kd.temperature, schedule, params.engine.cache_frozen_outputs)

    @classmethod
    def run_params(cls, params: Any) -> dict[str, Any]:
        return {f"kd.{k}": v for k, v in asdict(params.kd).items()}

    def prepare(self, data: DeviceDataset, train_index: torch.Tensor) -> None:
        self.teacher_outputs.prepare(data, train_index)

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        alpha = self.alpha(epoch)
        logits = self.student(batch)
        return {"ce": (1 - alpha) * F.cross_entropy(logits, batch["y"]),
                "kd": alpha * hinton_kd_loss(logits, self.teacher_outputs(batch), self.temperature)}

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return {"alpha": self.alpha(epoch)}
