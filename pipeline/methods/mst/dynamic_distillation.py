"""MST-Distill stage 3, dynamic knowledge distillation (paper §3.3, Eqs. 11–18; official-mst-spec.md §5.3).

The N specialised teachers are frozen. A GateNet reads the student's logits and gives confidences over
the teachers; each sample distils from its top-k teachers, and a load-balancing term keeps the batch-
average use of the teachers even:

    L = CE(z_s, y) + λ_kd(e) · (1/k) Σ_topk T²·KL(p_teacher ‖ p_s) + λ_lb(e) · L_lb(p̄)

λ_kd halves every 30 epochs and λ_lb drops 10 % every 10 epochs. Because the teachers are frozen,
deterministic and see no augmentation, their logits per training sample are computed once
(`WayOutputs`) and read back by sample index, exactly as if they were recomputed every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch, DeviceDataset
from pipeline.methods.base import DistillationMethod
from pipeline.methods.mst.gate_net import GateNet
from pipeline.methods.mst.losses import load_balancing_loss, topk_distillation
from pipeline.models.registry import Network

Way = Callable[[Batch], torch.Tensor]  # a specialised teacher: batch -> logits


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


class WayOutputs:
    """Logits of the N frozen specialised teachers, (B, N, C), cached per sample or recomputed."""

    def __init__(self, ways: Sequence[Way], enabled: bool = True, chunk_size: int = 512) -> None:
        self.ways = list(ways)
        self.enabled = enabled
        self.chunk_size = chunk_size
        self._table: torch.Tensor | None = None

    def _compute(self, batch: Batch) -> torch.Tensor:
        return torch.stack([way(batch) for way in self.ways], dim=1)

    @torch.no_grad()
    def prepare(self, data: DeviceDataset, index: torch.Tensor) -> None:
        if not self.enabled:
            return
        table = None
        for start in range(0, len(index), self.chunk_size):
            chunk = index[start:start + self.chunk_size]
            out = self._compute(data.batch(chunk))
            if table is None:
                table = torch.full((len(data), *out.shape[1:]), float("nan"), device=out.device, dtype=out.dtype)
            table[chunk] = out
        self._table = table

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        if not self.enabled:
            return self._compute(batch)
        if self._table is None:
            raise RuntimeError("WayOutputs.prepare() must run before the cached outputs are read")
        return self._table[batch["index"]]


class DynamicDistillation(DistillationMethod):
    """The stage-3 objective for one student, given its N frozen specialised teachers."""

    name = "mst"
    teacher_configs = ("mm+cm",)

    def __init__(self, student: Network, ways: Sequence[Way], num_classes: int, *, topk: int, temperature: float,
                 lb_mode: str, lb_divide_by_n: bool, weights: LossWeights, cache: bool = True) -> None:
        super().__init__(student)
        if not 1 <= topk <= len(ways):
            raise ValueError(f"topk = {topk} but there are {len(ways)} specialised teachers; expected 1..{len(ways)}")
        load_balancing_loss(torch.full((1, len(ways)), 1.0 / len(ways)), lb_mode)  # fail early on a bad mode
        self.gate = GateNet(num_classes, len(ways))
        self.ways = WayOutputs(ways, enabled=cache)
        self.topk, self.temperature = topk, temperature
        self.lb_mode, self.lb_divide_by_n, self.weights = lb_mode, lb_divide_by_n, weights
        self._routes = torch.zeros(len(ways))

    def prepare(self, data: DeviceDataset, train_index: torch.Tensor) -> None:
        self.ways.prepare(data, train_index)

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        lambda_kd, lambda_lb = self.weights.at(epoch)
        logits = self.student(batch)
        gate_probs = self.gate(logits)  # not detached: the LB gradient reaches the student (quirk Q5)
        kd, chosen = topk_distillation(logits, self.ways(batch), gate_probs, self.topk, self.temperature)
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
