"""DML, deep mutual learning (Zhang et al., CVPR 2018) over MM + CM peers (baselines-spec.md §2.8).

The authors' repository has no DML script. Three networks are trained from scratch, jointly: the
student (target modality), a multimodal network and the other modality's unimodal network; none
comes from the teachers stage. Every network learns from its labels and from its two peers. All
three are trained (train mode, in the optimiser); nothing is frozen, so nothing is cached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.common.kl import softened_kl
from pipeline.models.registry import Network


@dataclass(frozen=True)
class PeerLoss:
    """How a network learns from its peers: softmax temperature (KL scaled by T²), whether the peer
    targets are detached, and whether the per-peer KLs are averaged (`mean`) or added (`sum`)."""

    temperature: float
    detach_peers: bool
    peer_reduction: Literal["mean", "sum"]


VARIANTS = {
    # Zhang et al. 2018 (with K networks each learns from the average of its K − 1 peer KLs), KD-Zoo train_dml.py
    "dml": PeerLoss(temperature=1.0, detach_peers=True, peer_reduction="mean"),
    # the closest code in the authors' repository: MST-Distill collaborative initialisation (official-mst-spec.md §5.1)
    "mst_collaborative_init": PeerLoss(temperature=4.0, detach_peers=False, peer_reduction="sum"),
}


@dataclass(frozen=True)
class DMLParams:
    """Deep mutual learning of student + MM network + CM network, all from scratch. Not in the authors' code.

    Switch `variant`: default `dml` = the original method (T = 1, peer targets detached, peer KLs averaged);
    `mst_collaborative_init` = the closest in-repo analogue, MST-Distill's collaborative initialisation (T = 4,
    ×T², NOT detached so every KL also trains the peer, peer KLs summed). `kl_weight`: λ on each network's peer
    term (DML and MST collaborative initialisation: 1). Switch `peer_reduction`: `variant` (default: the
    variant's own, mean for `dml`), `mean`, or `sum` (Zhang et al.'s official code adds the peer KLs)."""

    teachers: list[str]
    variant: Literal["dml", "mst_collaborative_init"]
    kl_weight: float = field(metadata={"check": (lambda v: v >= 0, "a number >= 0")})
    peer_reduction: Literal["variant", "mean", "sum"] = "variant"

    def peer_loss(self) -> PeerLoss:
        """The variant's peer loss, with the reduction the switch asks for."""
        loss = VARIANTS[self.variant]
        if self.peer_reduction == "variant":
            return loss
        return dataclasses.replace(loss, peer_reduction=self.peer_reduction)


def mutual_learning_terms(logits: Mapping[str, torch.Tensor], labels: torch.Tensor, peer_loss: PeerLoss,
                          kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """For each network n: ce_n = CE(z_n, y) and kl_n = λ · R_{m≠n} T²·KL(p_m^T ‖ p_n^T), R = mean or sum over
    the peers m (batchmean KL). With `detach_peers` the target p_m is a constant, so kl_n trains network n
    only (Zhang et al., CVPR 2018, §3); without it every term also back-propagates into the peer
    (the authors' MST collaborative initialisation). With T = 1 the T² factor is 1."""
    terms: dict[str, torch.Tensor] = {}
    for name, own in logits.items():
        peers = [softened_kl(own, other.detach() if peer_loss.detach_peers else other, peer_loss.temperature)
                 for other_name, other in logits.items() if other_name != name]
        peer_term = torch.stack(peers).sum()
        if peer_loss.peer_reduction == "mean":
            peer_term = peer_term / len(peers)
        terms[f"ce_{name}"] = F.cross_entropy(own, labels)
        terms[f"kl_{name}"] = kl_weight * peer_term
    return terms


@register
class DeepMutualLearning(DistillationMethod):
    """Each of student, MM network and CM network minimises CE + λ·(mean over its two peers of
    KL(sg p_peer ‖ p_self)) at T = 1 (default `dml`); see `mutual_learning_terms`. The engine keeps the
    student with the lowest validation CE; the peers are discarded. All networks step on predictions made
    once per batch, as KD-Zoo's train_dml.py; the paper's Algorithm 1 refreshes the predictions between the
    networks' updates, which one engine step per batch cannot express (no switch)."""

    name = "dml"
    segmentation = True
    display_name = "DML"
    table_order = 70
    teacher_configs = ("mm+cm",)
    params_type = DMLParams

    def __init__(self, student: Network, mm_network: Network, cm_network: Network, peer_loss: PeerLoss,
                 kl_weight: float = 1.0) -> None:
        super().__init__(student)
        self.mm_network = mm_network
        self.cm_network = cm_network
        self.peer_loss = peer_loss
        self.kl_weight = kl_weight

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "DeepMutualLearning":
        # built after the student, MM first: a fixed order of RNG draws for a given seed
        mm_network = setup.build_network("mm")
        cm_network = setup.build_network(setup.other)
        p = setup.method_params
        return cls(setup.student, mm_network, cm_network, p.peer_loss(), p.kl_weight)

    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """One Adam(lr) with a parameter group per network. DML gives each network its own optimiser; with
        detached peers each network's loss depends only on its own parameters, and Adam's update is
        elementwise, so this is exactly three separate Adams stepped in the same iteration (tested). For
        `mst_collaborative_init` it is the authors' single Adam over the three networks."""
        groups = [{"params": list(net.parameters())} for net in (self.student, self.mm_network, self.cm_network)]
        return torch.optim.Adam(groups, lr=lr, fused=True)

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        logits = {"student": self.student(batch), "mm": self.mm_network(batch), "cm": self.cm_network(batch)}
        return mutual_learning_terms(logits, batch["y"], self.peer_loss, self.kl_weight)
