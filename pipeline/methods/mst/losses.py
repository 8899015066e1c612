"""MST-Distill's loss terms (paper §3; authors' code in official-mst-spec.md §4.7 and §5)."""

from __future__ import annotations

import math

import torch

from pipeline.methods.common.kl import softened_kl


def bidirectional_alignment(logits: list[torch.Tensor], temperature: float, detach_peer: bool = False) -> torch.Tensor:
    """Stage 1 alignment (Eqs. 1–4): Σ over ordered pairs (i, j), i ≠ j, of T²·KL(p_j^T ‖ p_i^T).

    Each unordered pair contributes KL in both directions. Paper and authors' code (quirk Q3) let
    gradients flow into both models of a pair; `detach_peer=True` detaches the target side of each
    term instead (DML-style mutual learning, the paper's Table 7 alternative)."""
    total = logits[0].new_zeros(())
    for i, learner in enumerate(logits):
        for j, target in enumerate(logits):
            if i != j:
                total = total + softened_kl(learner, target.detach() if detach_peer else target, temperature)
    return total


def load_balancing_loss(gate_probs: torch.Tensor, mode: str = "kl", divide_by_n: bool = False) -> torch.Tensor:
    """Keeps the router's batch-average use of the N teachers even.

    `kl` (paper Eq. 17): KL(U ‖ p̄) = Σ_j (1/N)·(log(1/N) − log p̄_j), p̄ = batch mean of the gate
    probabilities. The authors' code passes the 1-D p̄ to `KLDivLoss(reduction="batchmean")`, which
    divides by its length N (quirk Q6); `divide_by_n=True` reproduces that.
    `cv` (paper Table 8): std(importance)/mean(importance), importance = Σ_b gate probabilities, unbiased
    std, not squared (as the authors)."""
    n = gate_probs.shape[-1]
    if mode == "kl":
        mean_probs = gate_probs.mean(dim=0)
        loss = torch.sum((1.0 / n) * (math.log(1.0 / n) - torch.log(mean_probs)))
        return loss / n if divide_by_n else loss
    if mode == "cv":
        importance = gate_probs.sum(dim=0)
        return importance.std() / importance.mean()
    raise ValueError(f"unknown load-balancing mode {mode!r}; expected 'kl' or 'cv'")


def topk_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gate_probs: torch.Tensor, k: int,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic distillation (Eqs. 14–16): each sample distils from the k teachers its gate ranks highest.

    teacher_logits: (B, N, C) or, for dense outputs, (B, N, C, H, W) with one choice per image. Returns (1/k)·Σ_{i<k} T²·KL(p_{sel_i}^T ‖ p_s^T) (teachers detached, each term
    a batch mean with every sample using its own i-th choice) and the selected indices (B, k). As in
    the authors' code the selected teachers are not weighted by their gate probability, so the top-k
    choice passes no gradient to the GateNet (quirk Q4)."""
    n = teacher_logits.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"top-k distillation needs 1 <= k <= {n} (the number of teachers), got k = {k}")
    chosen = gate_probs.topk(k, dim=1).indices
    trailing = teacher_logits.shape[2:]
    index = chosen.reshape(*chosen.shape, *(1,) * len(trailing)).expand(-1, -1, *trailing)
    gathered = teacher_logits.gather(1, index).detach()
    loss = sum(softened_kl(student_logits, gathered[:, i], temperature) for i in range(k)) / k
    return loss, chosen
