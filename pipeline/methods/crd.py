"""CRD, contrastive representation distillation (Tian et al., ICLR 2020), as the authors run it
(baselines-spec.md §2.7, §3 CRD row, quirk Q8)."""

from __future__ import annotations

import math
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

NCE_EPS = 1e-7  # RepDistiller's eps in the NCE loss


@dataclass(frozen=True)
class CRDParams:
    """CRD as the authors run it: (1 − α)·CE + α·L_CRD, 128-d embeddings, K = 4096 other-class negatives,
    τ = 0.07, memory momentum 0.5; α = 0.5 halved every 30 epochs (`alpha`, see AlphaParams).

    Switches (default authors; original = RepDistiller / mdistiller / torchdistill):
    - `loss_form`: `authors` (1 − α)·CE + α·L_CRD; `original` 1·CE + `original_weight`·L_CRD (0.8; α unused).
    - `nce_k[dataset]`: negatives per sample; authors 4096, original 16384.
    `max_memory_mb`: bound on the contrast memory (banks + per-batch score tensors), checked before training.
    `cache_max_mb`: the frozen teacher's tapped features are cached per sample only when that table fits
    (AV-MNIST's pooled ThreeLayerCNN-A conv3 is 25,088 floats a sample); otherwise the teacher is re-run on
    every batch, which gives the same values.
    `taps[teacher architecture][student architecture]`: the teacher and student taps of that pair."""

    teachers: list[str]
    alpha: AlphaParams
    loss_form: Literal["authors", "original"]
    original_weight: float = field(metadata=NON_NEGATIVE)
    feat_dim: int = field(metadata=POSITIVE)
    nce_k: dict[str, int] = field(metadata={"check": (lambda v: all(k > 0 for k in v.values()),
                                                      "a mapping of dataset -> integer > 0")})
    nce_t: float = field(metadata=POSITIVE)
    momentum: float = field(metadata={"check": (lambda v: 0 <= v < 1, "a number in [0, 1)")})
    max_memory_mb: float = field(metadata=POSITIVE)
    cache_max_mb: float = field(metadata=NON_NEGATIVE)
    taps: PairTable[PairTaps]

    def validate(self) -> None:
        check_pair_table(self.taps, "taps", lambda pair: [("teacher", pair.teacher.module),
                                                          ("student", pair.student.module)])


def nce_loss(logits: torch.Tensor, positive: torch.Tensor, counts: torch.Tensor, log_z: torch.Tensor,
             n_data: int, k: int) -> torch.Tensor:
    """CRD's NCE loss (Tian et al. 2020, Eq. 18; RepDistiller `ContrastLoss`; baselines-spec.md §2.7).
    Normalised scores are P = exp(logit)/Z; with m = K negatives, P_n = 1/n_data, c = m·P_n + ε (ε = 1e-7):
        −[Σ_b log(P_b+ / (P_b+ + c)) + Σ_b Σ_k log(m·P_n / (P_bk + c))] / B.
    `logits` (..., B, n): dot products with every bank row over τ (leading dims: anchor sides, each with
    its `log_z` (...)); `positive` (B,): the column of each sample's own row; `counts` (B, n): how often
    each column was drawn as a negative (K per row, repeats counted). Returns one loss per side (...).
    Computed as log(P/(P + c)) = −softplus(log(Z·c) − logit) and log(m·P_n/(P + c)) = log(m·P_n/c) −
    softplus(logit − log(Z·c)): the formula above with fewer (B, K)-sized operations."""
    b, m_pn = logits.shape[-2], k / n_data
    log_zc = (log_z + math.log(m_pn + NCE_EPS))[..., None, None]
    own = logits.gather(-1, positive[:, None].expand(*logits.shape[:-1], 1))
    positive_term = -F.softplus(log_zc - own).sum(dim=(-2, -1))
    negative_term = b * k * math.log(m_pn / (m_pn + NCE_EPS)) - (counts * F.softplus(logits - log_zc)).sum(dim=(-2, -1))
    return -(positive_term + negative_term) / b


class NegativeSampler:
    """K negatives per sample drawn uniformly from the training samples of the other classes, without
    replacement when the sample's class leaves at least K of them and with replacement otherwise (the
    authors' `MultiModalX(for_contrast=True)`, quirk Q8). Vectorised over the batch: without replacement
    takes the K smallest of independent uniform keys, one per candidate (a uniform K-subset)."""

    def __init__(self, labels: torch.Tensor, num_classes: int, k: int, generator: torch.Generator) -> None:
        self.k = k
        self.generator = generator
        device = labels.device
        self.pool = (len(labels) - torch.bincount(labels, minlength=num_classes))  # other-class candidates
        self.width = int(self.pool.max())
        # table[c, :pool[c]]: the bank rows of the classes other than c
        self.table = torch.zeros(num_classes, self.width, dtype=torch.long, device=device)
        for c in range(num_classes):
            others = torch.nonzero(labels != c).flatten()
            self.table[c, :len(others)] = others
        present = torch.bincount(labels, minlength=num_classes) > 0
        if bool((self.pool[present] == 0).any()):
            raise ValueError("CRD needs training samples of at least two classes (negatives are other-class samples)")
        unique = self.pool >= k
        self.mode = "unique" if bool(unique.all()) else "replace" if not bool(unique.any()) else "mixed"

    def draw(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, K) positions of the negatives in each sample's candidate list `table[label]`."""
        pool = self.pool[labels][:, None]
        draws = None
        if self.mode != "unique":
            # ⌊r·pool / 2^24⌋ for a uniform 24-bit integer r, exact in int64: each candidate's probability
            # is 1/pool within a relative pool/2^24, below K/2^24 here (pool < K; 0.02 % at K = 4096);
            # cheaper than a modulo, wider integers, or float draws that need a clamp
            draws = torch.randint(0, 2**24, (len(labels), self.k), generator=self.generator,
                                  device=labels.device).mul_(pool).bitwise_right_shift_(24)
        if self.mode != "replace":
            keys = torch.rand(len(labels), self.width, generator=self.generator, device=labels.device)
            keys.masked_fill_(torch.arange(self.width, device=labels.device) >= pool, 2.0)
            distinct = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
            draws = distinct if draws is None else torch.where(pool >= self.k, distinct, draws)
        return draws

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, K) bank rows of negatives for samples of classes `labels`."""
        return self.table[labels[:, None], self.draw(labels)]

    def counts(self, labels: torch.Tensor, n_rows: int) -> torch.Tensor:
        """(B, n_rows) float: how often each bank row is drawn as a negative (the same draws as `__call__`
        from the same generator state), counted per candidate position first: two scatters of sizes
        B·K and B·pool instead of a (B, K) table lookup."""
        draws = self.draw(labels)
        per_position = torch.zeros(len(labels), self.width, device=labels.device).scatter_add_(
            1, draws, torch.ones(draws.shape, device=labels.device))
        # padding positions (beyond a class's pool) are never drawn, so they add 0 to row 0
        return torch.zeros(len(labels), n_rows, device=labels.device).scatter_add_(
            1, self.table[labels], per_position)


class ContrastMemory(nn.Module):
    """RepDistiller's `ContrastMemory`: a bank of teacher and one of student embeddings, one row per
    training sample; each student embedding is scored against the teacher bank and each teacher embedding
    against the student bank with exp(e·v/τ) / Z, and the banks are updated with momentum.

    The positive and the K negatives of each sample are read from the (B, n_train) matrix of dot products
    with the whole bank, the negatives as per-column draw counts, rather than from a gathered
    (B, 1 + K, d) copy of the bank rows as RepDistiller does: the same sums, over tensors of B·n_train
    instead of B·(1 + K)·d floats (AV-MNIST, B = 512: 86 MB each instead of 1.1 GB), and on AV-Digits
    over fewer columns than there are negatives. The two sides run stacked, one batched operation each."""

    def __init__(self, feat_dim: int, k: int, temperature: float, momentum: float) -> None:
        super().__init__()
        self.feat_dim, self.k, self.temperature, self.momentum = feat_dim, k, temperature, momentum
        self.sampler: NegativeSampler | None = None
        self.z_fixed = False

    def reset(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> None:
        """Fresh banks for training samples with classes `labels` (bank row i = i-th training sample),
        uniform in ±1/√(feat_dim/3), and unset normalising constants."""
        n, device = len(labels), labels.device
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        # RepDistiller draws memory_v1 (student) then memory_v2 (teacher); stored as [teacher, student]
        student, teacher = torch.rand(2, n, self.feat_dim, generator=generator, device=device) * (2 * stdv) - stdv
        self.register_buffer("banks", torch.stack([teacher, student]), persistent=False)
        # z[0]: student anchor (RepDistiller Z_v1), z[1]: teacher anchor (Z_v2)
        self.register_buffer("z", torch.full((2,), -1.0, device=device), persistent=False)
        self.z_fixed = False
        self.sampler = NegativeSampler(labels, num_classes, self.k, generator)

    @property
    def bank_teacher(self) -> torch.Tensor:
        """(n_train, feat_dim) teacher embeddings (RepDistiller's memory_v2)."""
        return self.banks[0]

    @property
    def bank_student(self) -> torch.Tensor:
        """(n_train, feat_dim) student embeddings (RepDistiller's memory_v1)."""
        return self.banks[1]

    @property
    def n_data(self) -> int:
        """Rows per bank: the number of training samples."""
        return self.banks.shape[1]

    def memory_mb(self, n_train: int, batch_size: int) -> float:
        """Rough upper estimate of the peak memory in MB: the two banks (and their updated copy); per batch,
        about nine (B, n_train) float tensors per side (logits, softplus terms, gradients; counts,
        sampling keys) and two (B, K) int64 tensors (draws, rows)."""
        floats = 4 * n_train * self.feat_dim + 2 * 9 * batch_size * n_train
        return (4 * floats + 2 * 8 * batch_size * self.k) / 2**20

    def forward(self, e_student: torch.Tensor, e_teacher: torch.Tensor, rows: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """L_CRD = NCE(student anchor vs teacher bank) + NCE(teacher anchor vs student bank), sharing the
        positive rows `rows` and the negatives; the first call sets Z = mean score · n_train per side
        (fixed from then on); then the momentum update of the positive rows (in the forward, as
        RepDistiller does)."""
        counts = self.sampler.counts(labels, self.n_data)
        anchors = torch.stack([e_student, e_teacher])
        logits = torch.bmm(anchors / self.temperature, self.banks.transpose(1, 2))  # (2, B, n)
        if not self.z_fixed:
            with torch.no_grad():
                scores = logits.exp()
                scored = scores.gather(2, rows[None, :, None].expand(2, -1, 1)).sum(dim=(1, 2)) + \
                    (counts * scores).sum(dim=(1, 2))
                self.z = scored / (len(rows) * (self.k + 1)) * self.n_data
            self.z_fixed = True
        loss = nce_loss(logits, rows, counts, self.z.log(), self.n_data, self.k).sum()
        self.update(anchors.flip(0), rows)
        return loss

    @torch.no_grad()
    def update(self, current: torch.Tensor, rows: torch.Tensor) -> None:
        """Positive rows ← normalise(m·row + (1 − m)·current embedding), m = momentum, for
        `current` = (teacher, student) embeddings, in the banks' order. Out of place: the banks read by
        this step's scores are still needed by its backward pass."""
        mixed = self.banks[:, rows] * self.momentum + current.detach() * (1 - self.momentum)
        self.banks = self.banks.index_copy(1, rows, mixed / mixed.pow(2).sum(2, keepdim=True).sqrt())


@register
class ContrastiveRepresentationDistillation(DistillationMethod):
    """L = (1 − α)·CE(z_s, y) + α·L_CRD with a frozen teacher (MM or CM); L_CRD contrasts 128-d embeddings
    of the tapped student and teacher features against memory banks of all training samples
    (baselines-spec.md §2.7)."""

    name = "crd"
    display_name = "CRD"
    table_order = 60
    teacher_configs = ("mm", "cm")
    params_type = CRDParams

    def __init__(self, student: Network, teacher: Network, student_tap: FeatureTap, teacher_tap: FeatureTap,
                 params: CRDParams, nce_k: int, sample: Batch, cache_teacher_outputs: bool = True,
                 where: str = "crd.taps") -> None:
        super().__init__(student)
        self.teacher = self.freeze(teacher)
        self.params = params
        self.where = where
        self.alpha = params.alpha
        self.cache_teacher_outputs = cache_teacher_outputs
        self.student_tapped = TappedNetwork(student, student_tap, f"{where}.student")
        self.teacher_tapped = TappedNetwork(self.teacher, teacher_tap, f"{where}.teacher")
        d_student = self.student_tapped.width(sample)
        d_teacher = self.teacher_tapped.width(sample)
        self.d_teacher = d_teacher
        # both embeddings are trained (the teacher's through the teacher-anchor scores), so only the frozen
        # teacher's raw tapped feature can be cached, not its embedding
        self.embed_student = L2Embedding(d_student, params.feat_dim)
        self.embed_teacher = L2Embedding(d_teacher, params.feat_dim)
        self.memory = ContrastMemory(params.feat_dim, nce_k, params.nce_t, params.momentum)
        # the memory's own random stream (bank initialisation, negatives), seeded from the run's seed
        self.seed = int(torch.randint(0, 2**62, (1,)).item())
        self.teacher_features = FrozenOutputs(lambda batch: self.teacher_tapped(batch)[1],
                                              enabled=cache_teacher_outputs)
        self._row_of: torch.Tensor | None = None

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> ContrastiveRepresentationDistillation:
        params: CRDParams = setup.method_params
        pair = pair_entry(params.taps, setup.teacher, setup.student, f"{cls.name}.taps")
        where = f"{cls.name}.taps.{setup.teacher.arch}.{setup.student.arch}"
        if setup.dataset not in params.nce_k:
            raise KeyError(f"{cls.name}.nce_k.{setup.dataset} is missing")
        return cls(setup.student, setup.teacher, pair.student, pair.teacher, params, params.nce_k[setup.dataset],
                   setup.sample, setup.cache_frozen_outputs, where)

    def prepare(self, context: RunContext) -> None:
        train = context.split["train"]
        need = self.memory.memory_mb(len(train), context.batch_size)
        if need > self.params.max_memory_mb:
            raise ValueError(f"crd.max_memory_mb is {self.params.max_memory_mb:g}, but the contrast memory needs "
                             f"about {need:.0f} MB ({len(train)} training samples, batch {context.batch_size}, "
                             f"nce_k {self.memory.k}, feat_dim {self.memory.feat_dim}); raise crd.max_memory_mb "
                             f"or lower crd.nce_k / the batch size")
        table_mb = 4 * len(context.data) * self.d_teacher / 2**20
        self.teacher_features.enabled = self.cache_teacher_outputs and table_mb <= self.params.cache_max_mb
        self.teacher_features.prepare(context.data, train)
        generator = torch.Generator(device=context.data.device).manual_seed(self.seed)
        self.memory.reset(context.data.y[train], context.num_classes, generator)
        # the batch carries positions in the full dataset; bank rows are positions in the training split.
        # Non-training positions map past the banks' end, so indexing with them fails loudly.
        self._row_of = torch.full((len(context.data),), len(train), dtype=torch.long, device=train.device)
        self._row_of[train] = torch.arange(len(train), device=train.device)

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        if self._row_of is None:
            raise RuntimeError("CRD's prepare() must run before training (it builds the contrast memory)")
        logits, feature = self.student_tapped(batch)
        e_student = self.embed_student(feature)
        e_teacher = self.embed_teacher(self.teacher_features(batch))
        crd = self.memory(e_student, e_teacher, self._row_of[batch["index"]], batch["y"])
        ce = F.cross_entropy(logits, batch["y"])
        if self.params.loss_form == "original":
            return {"ce": ce, "crd": self.params.original_weight * crd}
        return self.alpha.weigh(epoch, ce, {"crd": crd})

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.alpha.epoch_values(epoch) if self.params.loss_form == "authors" else {}
