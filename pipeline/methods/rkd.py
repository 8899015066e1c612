"""RKD, relational knowledge distillation (Park et al., CVPR 2019), as the authors run it
(baselines-spec.md §2.6, §3 RKD row, quirk Q3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.tensors import Batch
from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.common.features import PairTable, check_pair_table, pair_entry
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.methods.common.tapped_features import FeatureTap, L2Embedding, PairTaps, TappedNetwork
from pipeline.params import NON_NEGATIVE, POSITIVE
from pipeline.training.phases import RunContext
from pipeline.models.registry import Network


@dataclass(frozen=True)
class RKDParams:
    """RKD as the authors run it: (1 − α)·CE + α·(1·L_dist + 2·L_angle) on 128-d embeddings, α = 0.5 halved
    every 30 epochs (`alpha`, see AlphaParams).

    Switches (default authors; original = RepDistiller / mdistiller classification setting):
    - `loss_form`: `authors` (1 − α)·CE + α·L_RKD; `original` 1·CE + 1·L_RKD (α unused).
    - `distance_weight` / `angle_weight`: authors 1 / 2; original 25 / 50.
    - `embedding`: `authors` — student feature → learned Linear(d→`feat_dim`) + L2 normalisation, teacher
      feature → a fixed random Linear(d→`feat_dim`) + L2 normalisation (Q3: the authors' teacher embedding
      is in the optimiser but never gets a gradient); `none` — the raw tapped features, as RepDistiller
      (memory grows with B²·d, so meant for small features such as AV-Digits').
    `taps[teacher architecture][student architecture]`: the teacher and student taps of that pair."""

    teachers: list[str]
    alpha: AlphaParams
    loss_form: Literal["authors", "original"]
    distance_weight: float = field(metadata=NON_NEGATIVE)
    angle_weight: float = field(metadata=NON_NEGATIVE)
    embedding: Literal["authors", "none"]
    feat_dim: int = field(metadata=POSITIVE)
    taps: PairTable[PairTaps]

    def validate(self) -> None:
        check_pair_table(self.taps, "taps", lambda pair: [("teacher", pair.teacher.module),
                                                          ("student", pair.student.module)])


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, B) Euclidean distances ‖x_i − x_j‖ via the Gram matrix, squared distances clamped at `eps`
    before the square root (keeps the gradient finite), diagonal set to 0 (RKD paper, Eq. 3)."""
    squared = x.pow(2).sum(dim=1)
    d2 = (squared[:, None] + squared[None, :] - 2 * x @ x.t()).clamp(min=eps)
    return d2.sqrt().masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD (Park et al. 2019, Eq. 3–4): smooth-L1 (β = 1, mean over the B² entries) between
    the student's and the teacher's pairwise distances, each divided by its mean over the B(B − 1) pairs
    i ≠ j. The teacher side carries no gradient. Zero for a batch of one sample (no pairs)."""
    b = len(student)
    if b < 2:
        return student.sum() * 0.0
    with torch.no_grad():
        t_d = pairwise_distances(teacher)
        t_d = t_d / (t_d.sum() / (b * (b - 1)))
    s_d = pairwise_distances(student)
    # the authors average over the entries > 0; off-diagonal entries are ≥ √eps > 0, the diagonal is 0
    s_d = s_d / (s_d.sum() / (b * (b - 1)))
    return F.smooth_l1_loss(s_d, t_d, reduction="mean", beta=1.0)


def triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """(B·B·B,) cosines cos∠(x_j − x_i, x_k − x_i) for every anchor i and pair (j, k), flattened in (i, j, k)
    order; a zero difference (j = i or k = i) gives cosine 0 (RKD paper, Eq. 5)."""
    diff = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # diff[i, j] = unit(x_j − x_i)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD (Park et al. 2019, Eq. 5–6): smooth-L1 (β = 1, mean over all B³ triplets) between the
    student's and the teacher's triplet cosines; the teacher side carries no gradient."""
    with torch.no_grad():
        t_angle = triplet_cosines(teacher)
    return F.smooth_l1_loss(triplet_cosines(student), t_angle, reduction="mean", beta=1.0)


@register
class RelationalKD(DistillationMethod):
    """L = (1 − α)·CE(z_s, y) + α·(w_d·L_dist + w_a·L_angle)(e_s, e_t) with a frozen teacher (MM or CM),
    e = L2-normalised 128-d embeddings of the tapped features (baselines-spec.md §2.6)."""

    name = "rkd"
    display_name = "RKD"
    table_order = 50
    teacher_configs = ("mm", "cm")
    params_type = RKDParams

    def __init__(self, student: Network, teacher: Network, student_tap: FeatureTap, teacher_tap: FeatureTap,
                 params: RKDParams, sample: Batch, cache_teacher_outputs: bool = True,
                 where: str = "rkd.taps") -> None:
        super().__init__(student)
        self.teacher = self.freeze(teacher)
        self.params = params
        self.alpha = params.alpha
        self.student_tapped = TappedNetwork(student, student_tap, f"{where}.student")
        self.teacher_tapped = TappedNetwork(self.teacher, teacher_tap, f"{where}.teacher")
        d_student = self.student_tapped.width(sample)
        d_teacher = self.teacher_tapped.width(sample)
        if params.embedding == "authors":
            self.embed_student: nn.Module = L2Embedding(d_student, params.feat_dim)
            # Q3: the authors' teacher embedding sits in the optimiser but never receives a gradient, so it
            # is a fixed random projection; frozen here, which also lets its outputs be cached
            self.embed_teacher: nn.Module = self.freeze(L2Embedding(d_teacher, params.feat_dim))
        else:
            self.embed_student = self.embed_teacher = nn.Identity()
        # teacher, teacher tap and teacher embedding are all fixed functions of the sample: cache per sample
        self.teacher_embeddings = FrozenOutputs(self._embed_teacher, enabled=cache_teacher_outputs)

    @torch.no_grad()
    def _embed_teacher(self, batch: Batch) -> torch.Tensor:
        self.embed_teacher.eval()
        return self.embed_teacher(self.teacher_tapped(batch)[1])

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> RelationalKD:
        params: RKDParams = setup.method_params
        pair = pair_entry(params.taps, setup.teacher, setup.student, f"{cls.name}.taps")
        where = f"{cls.name}.taps.{setup.teacher.arch}.{setup.student.arch}"
        return cls(setup.student, setup.teacher, pair.student, pair.teacher, params, setup.sample,
                   setup.cache_frozen_outputs, where)

    def prepare(self, context: RunContext) -> None:
        self.teacher_embeddings.prepare(context.data, context.split["train"])

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        logits, feature = self.student_tapped(batch)
        e_s = self.embed_student(feature)
        e_t = self.teacher_embeddings(batch)
        ce = F.cross_entropy(logits, batch["y"])
        distance = self.params.distance_weight * rkd_distance_loss(e_s, e_t)
        angle = self.params.angle_weight * rkd_angle_loss(e_s, e_t)
        if self.params.loss_form == "original":
            return {"ce": ce, "rkd_distance": distance, "rkd_angle": angle}
        return self.alpha.weigh(epoch, ce, {"rkd_distance": distance, "rkd_angle": angle})

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.alpha.epoch_values(epoch) if self.params.loss_form == "authors" else {}
