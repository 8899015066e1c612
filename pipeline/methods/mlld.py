"""MLLD, multi-level logit distillation (Jin et al., CVPR 2023), as the authors run it
(baselines-spec.md §2.3 and the MLLD row of §3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.models.registry import Network
from pipeline.training.phases import RunContext


@dataclass(frozen=True)
class MLLDParams:
    """MLLD as the authors run it: (1 − α)·CE + α·L_MLLD over `temperatures` {2, 3, 4, 5, 6}, α = 0.5 with
    the authors' step schedule (`alpha`, see AlphaParams).

    Switches (default = the authors' main-MLLD.py; the other value = the official MLLD code,
    Jin-Ying/Multi-Level-Logit-Distillation):
    - `normalisation`: `authors` — class and batch terms are mean squared errors (÷C², ÷B²) and the
      3 terms × len(temperatures) are averaged; `official` — class term Σ/C, batch term Σ/B, all terms and
      temperatures summed.
    - `confidence_masks`: false (authors); true (official) — instance and batch terms are scaled by the
      fraction of samples whose teacher confidence max softmax(z_t) is ≤ the batch median, the class
      term by the fraction of classes whose batch-summed teacher probability is ≤ the median over classes
      (the official code masks an already-reduced scalar, so the mask acts as that fraction).
    The official recipe also uses CE 0.1 / KD 0.9 with no decay: `alpha: {initial: 0.9, schedule: constant}`.
    Left out (no augmentation in this benchmark): the official strong-augmentation view, i.e. its CE and
    unmasked instance terms on the strongly augmented images."""

    teachers: list[str]
    temperatures: list[float] = field(metadata={"check": (lambda v: len(v) > 0 and all(t > 0 for t in v),
                                                          "a non-empty list of numbers > 0")})
    alpha: AlphaParams
    normalisation: Literal["authors", "official"]
    confidence_masks: bool


def confidence_fractions(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official MLLD confidence masks, as the fractions they select: (share of samples with
    max_c softmax(z_t)_c ≤ its batch median, share of classes with Σ_b softmax(z_t)_b,c ≤ the median over
    classes). Medians interpolate linearly, like numpy's percentile(·, 50) in the official code."""
    p_t = F.softmax(teacher_logits.detach(), dim=1)
    confidence = p_t.max(dim=1).values
    class_confidence = p_t.sum(dim=0)
    sample_fraction = (confidence <= torch.quantile(confidence, 0.5)).float().mean()
    class_fraction = (class_confidence <= torch.quantile(class_confidence, 0.5)).float().mean()
    return sample_fraction, class_fraction


def multi_level_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperatures: Sequence[float],
                      normalisation: str = "authors", confidence_masks: bool = False) -> dict[str, torch.Tensor]:
    """The three MLLD levels (Jin et al. 2023, Eqs. 3–5; baselines-spec.md §2.3), each reduced over the
    temperatures so that their sum is L_MLLD. For each T, P = softmax(z/T) (B×C), teacher detached:
    - instance: T²·(1/B) Σ_b KL(P_t,b ‖ P_s,b);
    - class:    ‖P_sᵀP_s − P_tᵀP_t‖² / C² (`authors`) or / C (`official`);
    - batch:    ‖P_sP_sᵀ − P_tP_tᵀ‖² / B² (`authors`) or / B (`official`).
    `authors`: each level is summed over T and divided by 3·len(temperatures) (L = mean of the 3·n terms);
    `official`: summed over T, no division. `confidence_masks` scales them by `confidence_fractions`.
    All temperatures are computed at once as a (n_T, B, C) stack."""
    teacher_logits = teacher_logits.detach()
    batch_size, num_classes = student_logits.shape
    temps = student_logits.new_tensor(list(temperatures)).view(-1, 1, 1)
    log_p_s = F.log_softmax(student_logits.unsqueeze(0) / temps, dim=2)
    p_s = log_p_s.exp()
    p_t = F.softmax(teacher_logits.unsqueeze(0) / temps, dim=2)
    # KL with batchmean per temperature: sum over classes, mean over samples, then ×T² (gradient scale)
    instance = F.kl_div(log_p_s, p_t, reduction="none").sum(2).mean(1) * temps.view(-1) ** 2
    gram_class = (p_s.transpose(1, 2) @ p_s - p_t.transpose(1, 2) @ p_t).pow(2).sum((1, 2))
    gram_batch = (p_s @ p_s.transpose(1, 2) - p_t @ p_t.transpose(1, 2)).pow(2).sum((1, 2))
    if normalisation == "authors":
        levels = {"instance": instance, "class": gram_class / num_classes**2, "batch": gram_batch / batch_size**2}
        scale = 1.0 / (3 * len(temperatures))
    elif normalisation == "official":
        levels = {"instance": instance, "class": gram_class / num_classes, "batch": gram_batch / batch_size}
        scale = 1.0
    else:
        raise ValueError(f"unknown MLLD normalisation {normalisation!r}; expected 'authors' or 'official'")
    terms = {name: value.sum() * scale for name, value in levels.items()}
    if confidence_masks:
        sample_fraction, class_fraction = confidence_fractions(teacher_logits)
        terms = {"instance": terms["instance"] * sample_fraction, "class": terms["class"] * class_fraction,
                 "batch": terms["batch"] * sample_fraction}
    return terms


def mlld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperatures: Sequence[float],
              normalisation: str = "authors", confidence_masks: bool = False) -> torch.Tensor:
    """L_MLLD = instance + class + batch terms of `multi_level_terms` (authors' default: their mean over the
    temperatures and the three levels, KD_methods/MLLD.py)."""
    terms = multi_level_terms(student_logits, teacher_logits, temperatures, normalisation, confidence_masks)
    return torch.stack(list(terms.values())).sum()


@register
class MultiLevelLogitDistillation(DistillationMethod):
    """L = (1 − α)·CE(z_s, y) + α·L_MLLD(z_s, z_t) with a frozen teacher (MM or CM); the three levels are
    reported as separate terms `mlld_instance`, `mlld_class`, `mlld_batch` (each already × α)."""

    name = "mlld"
    display_name = "MLLD"
    table_order = 20
    teacher_configs = ("mm", "cm")
    params_type = MLLDParams

    def __init__(self, student: Network, teacher: Network, temperatures: Sequence[float], alpha: AlphaParams,
                 normalisation: str = "authors", confidence_masks: bool = False,
                 cache_teacher_outputs: bool = True) -> None:
        super().__init__(student)
        if normalisation not in ("authors", "official"):
            raise ValueError(f"unknown MLLD normalisation {normalisation!r}; expected 'authors' or 'official'")
        self.teacher = self.freeze(teacher)
        self.temperatures = tuple(float(t) for t in temperatures)
        self.alpha = alpha
        self.normalisation = normalisation
        self.confidence_masks = confidence_masks
        # teacher frozen, eval mode, no augmentation: its logits are a fixed function of the sample
        self.teacher_outputs = FrozenOutputs(self.teacher, enabled=cache_teacher_outputs)

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "MultiLevelLogitDistillation":
        p = setup.method_params
        return cls(setup.student, setup.teacher, p.temperatures, p.alpha, p.normalisation, p.confidence_masks,
                   setup.cache_frozen_outputs)

    def prepare(self, context: RunContext) -> None:
        self.teacher_outputs.prepare(context.data, context.split["train"])

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        logits = self.student(batch)
        levels = multi_level_terms(logits, self.teacher_outputs(batch), self.temperatures, self.normalisation,
                                   self.confidence_masks)
        return self.alpha.weigh(epoch, F.cross_entropy(logits, batch["y"]),
                                {f"mlld_{name}": value for name, value in levels.items()})

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.alpha.epoch_values(epoch)
