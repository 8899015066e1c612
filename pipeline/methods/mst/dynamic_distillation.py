"""MST-Distill phase 3, dynamic knowledge distillation (paper §3.3, Eqs. 11–18; official-mst-spec.md §5.3).

The N specialised teachers are frozen. A GateNet reads the student's logits and gives confidences over
the teachers; each sample distils from its top-k teachers, and a load-balancing term keeps the batch-
average use of the teachers even:

    L = CE(z_s, y) + λ_kd(e) · (1/k) Σ_topk T²·KL(p_teacher ‖ p_s) + λ_lb(e) · L_lb(p̄)

λ_kd halves every 30 epochs and λ_lb drops 10 % every 10 epochs. Because the teachers are frozen,
deterministic and see no augmentation, their logits per training sample are computed once
(`FrozenOutputs`) and read back by sample index, exactly as if they were recomputed every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch import nn

from pipeline.data.tensors import Batch
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.methods.mst.gate_net import gate_net_for
from pipeline.methods.mst.losses import load_balancing_loss, topk_distillation
from pipeline.training.phases import RunContext

Specialist = Callable[[Batch], torch.Tensor]  # a specialised teacher: batch -> logits


@dataclass(frozen=True)
class LossWeights:
    """λ_kd and λ_lb per 0-based epoch. Paper: λ_kd = λ1·0.5^⌊e/30⌋, λ_lb = λ2·0.9^⌊e/10⌋. The authors
    apply the decays after validation at the end of every epoch including epoch 0 (quirk Q8), i.e.
    exponents ⌈e/30⌉ and ⌈e/10⌉; `decay_after_epoch0=True` reproduces that."""

    kd: float = 1.0
    lb: float = 1.0
    decay_after_epoch0: bool = False

    def _steps(self, epoch: int, every: int) -> int:
        return math.ceil(epoch / every) if self.decay_after_epoch0 else epoch // every

    def at(self, epoch: int) -> tuple[float, float]:
        return self.kd * 0.5 ** self._steps(epoch, 30), self.lb * 0.9 ** self._steps(epoch, 10)


class DynamicDistillation(nn.Module):
    """The phase-3 objective given a student's logits and the N frozen specialised teachers: a GateNet over
    the teachers, top-k distillation and load balancing. `logits_shape`: the student's per-sample logits,
    (C,) or for segmentation (C, H, W) (one routing decision per image, as the authors' GateNet_dense)."""

    def __init__(self, specialists: Sequence[Specialist], logits_shape: tuple[int, ...], *, topk: int, temperature: float,
                 lb_mode: str, lb_divide_by_n: bool, weights: LossWeights, cache: bool = True) -> None:
        super().__init__()
        if not 1 <= topk <= len(specialists):
            raise ValueError(f"topk = {topk} but there are {len(specialists)} specialised teachers; expected "
                             f"1..{len(specialists)}")
        load_balancing_loss(torch.full((1, len(specialists)), 1.0 / len(specialists)), lb_mode)  # fail early
        self.gate = gate_net_for(logits_shape, len(specialists))   # (C,) or, segmentation, (C, H, W)
        specialists = list(specialists)
        # the N specialised teachers' logits as one (B, N, C) tensor, computed once per training sample
        self.specialists = FrozenOutputs(lambda batch: torch.stack([s(batch) for s in specialists], dim=1),
                                         enabled=cache)
        self.topk, self.temperature = topk, temperature
        self.lb_mode, self.lb_divide_by_n, self.weights = lb_mode, lb_divide_by_n, weights
        self._routes = torch.zeros(len(specialists))

    @property
    def num_teachers(self) -> int:
        return len(self._routes)

    def prepare(self, context: RunContext) -> None:
        self.specialists.prepare(context.data, context.split["train"])

    def terms(self, logits: torch.Tensor, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        lambda_kd, lambda_lb = self.weights.at(epoch)
        gate_probs = self.gate(logits)  # not detached: the LB gradient reaches the student (quirk Q5)
        kd, chosen = topk_distillation(logits, self.specialists(batch), gate_probs, self.topk, self.temperature)
        if self.training:
            self._routes += torch.bincount(chosen.flatten().cpu(), minlength=len(self._routes))
        return {"ce": F.cross_entropy(logits, batch["y"]), "kd": lambda_kd * kd,
                "lb": lambda_lb * load_balancing_loss(gate_probs, self.lb_mode, self.lb_divide_by_n)}

    def epoch_values(self, epoch: int) -> dict[str, float]:
        """λ values and the fraction of top-k picks that went to each teacher during the epoch."""
        lambda_kd, lambda_lb = self.weights.at(epoch)
        total = self._routes.sum().item() or 1.0
        values = {"lambda_kd": lambda_kd, "lambda_lb": lambda_lb,
                  **{f"route_{i}": count / total for i, count in enumerate(self._routes.tolist())}}
        self._routes.zero_()
        return values
