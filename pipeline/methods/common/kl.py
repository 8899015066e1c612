"""KL divergences between softened predictions, shared by every logit-based method."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softened_kl(learner_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · (1/P) Σ_p KL(softmax(z_target,p / T) ‖ softmax(z_learner,p / T)), gradients to both sides, over
    the P predictions of the batch: its B samples, or for dense (B, C, H, W) logits its B·H·W pixels.
    For classification this is `batchmean` (sum over classes, mean over the batch); for segmentation the
    authors' `batchmean` divided again by H·W, a per-pixel mean over every pixel, void included (quirk
    Q13). T² keeps gradient magnitudes as T grows. Softmax over dim 1, the class axis, in both cases."""
    log_p_learner = F.log_softmax(learner_logits / temperature, dim=1)
    p_target = F.softmax(target_logits / temperature, dim=1)
    predictions = learner_logits.numel() // learner_logits.shape[1]
    return F.kl_div(log_p_learner, p_target, reduction="sum") / predictions * temperature**2


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_t^T ‖ p_s^T) with the teacher detached — Hinton et al. 2015, Eq. 2 scaled by T²."""
    return softened_kl(student_logits, teacher_logits.detach(), temperature)
