"""MST-Distill stage 1, collaborative initialisation (paper §3.1, Eqs. 1–4; official-mst-spec.md §5.1).

The multimodal network and every unimodal network are trained together from scratch: each with its
cross-entropy, plus the bidirectional T-softened KL between every pair of networks. One Adam optimiser
over all networks, one backward pass per batch. As in the authors' code there is no validation-based
selection: the weights after the last epoch are kept (they are evaluated on validation each epoch only
for logging). `detach_peer` switches the alignment to DML-style detached targets (paper Table 7).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.data.tensors import DeviceDataset
from pipeline.methods.mst.losses import bidirectional_alignment
from pipeline.models.registry import Network
from pipeline.training.engine import evaluate, optimise_epoch


def collaborative_init(networks: dict[str, Network], data: DeviceDataset, split: dict[str, torch.Tensor], *,
                       epochs: int, batch_size: int, lr: float, temperature: float, detach_peer: bool,
                       num_classes: int, generator: torch.Generator,
                       on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train `networks` ({role: network}) jointly in place; returns the last epoch's metrics."""
    roles = list(networks)
    parameters = [p for role in roles for p in networks[role].parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr, fused=True)
    def loss_terms(batch):
        logits = [networks[role](batch) for role in roles]
        terms = {f"ce_{role}": F.cross_entropy(z, batch["y"]) for role, z in zip(roles, logits)}
        terms["alignment"] = bidirectional_alignment(logits, temperature, detach_peer=detach_peer)
        return terms

    metrics: dict[str, float] = {}
    for epoch in range(epochs):
        for net in networks.values():
            net.train()
        metrics = optimise_epoch(loss_terms, data.batches(split["train"], batch_size, generator), optimizer, epoch)
        for role in roles:
            metrics.update(evaluate(networks[role], data, split["val"], num_classes, batch_size).as_dict(f"val_{role}"))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics
