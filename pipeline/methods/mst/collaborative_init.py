"""MST-Distill phase 1, collaborative initialisation (paper §3.1, Eqs. 1–4; official-mst-spec.md §5.1).

The multimodal network and every unimodal network are trained together from scratch: each with its
cross-entropy, plus the bidirectional T-softened KL between every pair of networks. One Adam optimiser
over all networks, one backward pass per batch. As in the authors' code there is no validation-based
selection: the weights after the last epoch are kept (they are evaluated on validation each epoch only
for logging). `detach_peer` switches the alignment to DML-style detached targets (paper Table 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.mst.losses import bidirectional_alignment
from pipeline.models.registry import Network
from pipeline.training.phases import Phase, RunContext


def collaborative_init_phase(networks: dict[str, Network], *, epochs: int, lr: float, temperature: float,
                             detach_peer: bool, context: RunContext) -> Phase:
    """Phase `collaborative_init` over `networks` ({role: network}), trained jointly; no selection."""
    roles = list(networks)

    def loss_terms(batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        logits = [networks[role](batch) for role in roles]
        terms = {f"ce_{role}": F.cross_entropy(z, batch["y"]) for role, z in zip(roles, logits)}
        terms["alignment"] = bidirectional_alignment(logits, temperature, detach_peer=detach_peer)
        return terms

    def validate(epoch: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for role in roles:
            metrics.update(context.evaluate(networks[role], "val").as_dict(f"val_{role}"))
        return metrics

    return Phase("collaborative_init", epochs, loss_terms,
                 lambda: torch.optim.Adam([p for role in roles for p in networks[role].parameters()], lr=lr,
                                          fused=True),
                 train_modules=list(networks.values()), validate=validate)
