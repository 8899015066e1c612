"""KD (Hinton et al., 2015) as the authors run it (baselines-spec.md §2.2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.base import DistillationMethod, MethodSetup, TrainContext, register
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
class KDParams:
    """Hinton KD as the authors run it: (1 − α)·CE + α·T²·KL, T = 4, α = 0.5.
    `alpha_schedule`: `authors_step` halves α after every `alpha_decay_every` epochs (main-KD.py);
    `constant` keeps α fixed (Hinton et al.). `teachers`: the Table 1 rows run (mm, cm)."""

    teachers: list[str]
    temperature: float = field(metadata={"check": (lambda v: v > 0, "a number > 0")})
    alpha: float = field(metadata={"check": (lambda v: 0 <= v <= 1, "a number between 0 and 1")})
    alpha_schedule: Literal["authors_step", "constant"]
    alpha_decay_every: int = field(metadata={"check": (lambda v: v > 0, "an integer > 0")})
    alpha_decay_factor: float = field(metadata={"check": (lambda v: 0 <= v <= 1, "a number between 0 and 1")})

    def schedule(self) -> "AlphaSchedule":
        return AlphaSchedule(self.alpha, self.alpha_schedule, self.alpha_decay_every, self.alpha_decay_factor)


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
    params_type = KDParams

    def __init__(self, student: Network, teacher: Network, temperature: float, alpha: AlphaSchedule,
                 cache_teacher_outputs: bool = True) -> None:
        super().__init__(student)
        self.teacher = self.freeze(teacher)
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_outputs = FrozenOutputs(self.teacher, enabled=cache_teacher_outputs)

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "KnowledgeDistillation":
        kd = setup.method_params
        return cls(setup.student, setup.teacher, kd.temperature, kd.schedule(), setup.cache_frozen_outputs)

    def prepare(self, context: TrainContext) -> None:
        self.teacher_outputs.prepare(context.data, context.split["train"])

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        alpha = self.alpha(epoch)
        logits = self.student(batch)
        return {"ce": (1 - alpha) * F.cross_entropy(logits, batch["y"]),
                "kd": alpha * hinton_kd_loss(logits, self.teacher_outputs(batch), self.temperature)}

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return {"alpha": self.alpha(epoch)}
