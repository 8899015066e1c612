"""KL divergences between softened predictions, shared by every logit-based method."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softened_kl(learner_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · (1/B) Σ_b KL(softmax(z_target,b / T) ‖ softmax(z_learner,b / T)), gradients to both sides.
    `batchmean` sums over classes and averages over the batch; T² keeps gradient magnitudes as T grows."""
    log_p_learner = F.log_softmax(learner_logits / temperature, dim=1)
    p_target = F.softmax(target_logits / temperature, dim=1)
    return F.kl_div(log_p_learner, p_target, reduction="batchmean") * temperature**2


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_t^T ‖ p_s^T) with the teacher detached — Hinton et al. 2015, Eq. 2 scaled by T²."""
    return softened_kl(student_logits, teacher_logits.detach(), temperature)
