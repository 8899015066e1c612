"""C²KD (Huo et al., CVPR 2024) as the authors run it (baselines-spec.md §2.10; quirks Q1, Q11).

Cross-modal teacher and student are bridged by two small proxy heads on intermediate features. Each
network and its proxy distil each other both ways; the two proxies exchange non-target class knowledge,
but only for samples whose proxy rankings agree (Kendall's τ-b above `krc`). Unlike every other
baseline, the CM teacher (the teachers-stage checkpoint) is TRAINED as well: it is in train mode and
in the optimiser, together with the student and both proxies (Q11). Its outputs therefore change every
step and are never cached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.catalog import dataset_spec
from pipeline.data.tensors import IGNORE, Batch
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.common.features import PairTable, check_pair_table, pair_entry, probe_shapes
from pipeline.methods.common.kl import hinton_kd_loss
from pipeline.models.registry import Network
from pipeline.models.taps import FeatureTaps
from pipeline.training.phases import RunContext


@dataclass(frozen=True)
class C2KDTaps:
    """The module whose output feeds each proxy head (names relative to `Network.body`)."""

    teacher: str
    student: str


@dataclass(frozen=True)
class C2KDParams:
    """C²KD. Defaults follow the authors' main-C2KD.py; switches restore the official huofushuo/C2KD code.

    `taps`: per teacher architecture, per student architecture, the tapped modules.
    `lr`, `momentum`: one SGD (no weight decay) over teacher, student and both proxies — C²KD's own
    learning rate, not the engine's. `krc`: the Kendall τ-b threshold of the on-the-fly selection.
    Switch `lr_schedule`: default `constant` (authors: the poly decay is computed but never written into
    the optimiser, Q1); `poly` = official: lr = poly_min_lr + (lr − poly_min_lr)·(1 − progress)^poly_power.
    Switch `selection`: default `val_loss` (authors: the engine's min validation CE of the student, every
    epoch); `late_val_accuracy` = official: best validation accuracy, ties to the later epoch, counting only
    epochs ≥ ⌊selection_start·epochs⌋ (official: epoch ≥ 80 of 100).
    Segmentation (the authors' NYU code): proxies `ProxyNet_resoFixed` (1×1 conv + BN + ReLU, 1×1 conv to
    K, bilinear upsampling to the output size) on decoder maps, an image's τ = the mean of its pixels' τ.
    Switch `dense_mask`: default `authors` (their `ntkl_ss`: the non-target KL is a per-pixel mean over the
    batch, computed whenever any image passes the τ test, unmasked); `per_image`: each image's mask weighs
    its pixels, as a sample's mask does on classification."""

    teachers: list[str]
    taps: PairTable[C2KDTaps]
    lr: float = field(metadata={"check": (lambda v: v > 0, "a number > 0")})
    momentum: float = field(metadata={"check": (lambda v: 0 <= v < 1, "a number in [0, 1)")})
    krc: float = field(metadata={"check": (lambda v: -1 <= v <= 1, "a number between -1 and 1")})
    lr_schedule: Literal["constant", "poly"]
    poly_power: float = field(metadata={"check": (lambda v: v > 0, "a number > 0")})
    poly_min_lr: float = field(metadata={"check": (lambda v: v >= 0, "a number >= 0")})
    dense_mask: Literal["authors", "per_image"]
    selection: Literal["val_loss", "late_val_accuracy"]
    selection_start: float = field(metadata={"check": (lambda v: 0 <= v < 1, "a number in [0, 1)")})

    def validate(self) -> None:
        check_pair_table(self.taps, "taps", lambda taps: [("teacher", taps.teacher), ("student", taps.student)])


class ProxyNet1D(nn.Module):
    """Proxy head for a (B, d) feature: Linear(d→d), BatchNorm1d, LeakyReLU(0.1), Linear(d→K).
    Linear weights Kaiming-normal (fan_out), zero biases, as the authors' `ProxyNet1D`."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.activation = nn.LeakyReLU(0.1)
        self.fc2 = nn.Linear(dim, num_classes)
        for linear in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.bn(self.fc1(x))))


class ProxyNet(nn.Module):
    """Proxy head for a (B, C, H, W) map: global average pool, 1×1 conv (C→C, no bias), BatchNorm2d,
    LeakyReLU(0.1), flatten, Linear(C→K). The conv is Kaiming-normal (fan_out); the Linear keeps
    PyTorch's default initialisation, as the authors' `ProxyNet` (only convs and BN are re-initialised)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.activation = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(channels, num_classes)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.activation(self.bn(self.conv(self.pool(x)))).flatten(1))


class DenseProxyNet(nn.Module):
    """Proxy head of a segmentation network (the authors' `ProxyNet_resoFixed`): 1×1 conv (C→C) + BN + ReLU,
    1×1 conv (C→K), bilinear upsampling (align_corners False) to the network's output size."""

    def __init__(self, channels: int, num_classes: int, output_size: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.output_size = tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return F.interpolate(logits, size=self.output_size, mode="bilinear", align_corners=False)


def build_proxy(feature_shape: tuple[int, ...], num_classes: int,
                output_shape: tuple[int, ...] | None = None) -> nn.Module:
    """ProxyNet1D for a per-sample vector (d,), ProxyNet for a per-sample map (C, H, W); for a network whose
    per-sample output is a (K, H, W) map (segmentation), DenseProxyNet on the (C, h, w) tap."""
    if output_shape is not None and len(output_shape) == 3:
        if len(feature_shape) != 3:
            raise ValueError(f"C²KD proxies of a segmentation network read a map (C, h, w), got {feature_shape}")
        return DenseProxyNet(feature_shape[0], num_classes, output_shape[1:])
    if len(feature_shape) == 1:
        return ProxyNet1D(feature_shape[0], num_classes)
    if len(feature_shape) == 3:
        return ProxyNet(feature_shape[0], num_classes)
    raise ValueError(f"C²KD proxies read a vector (d,) or a map (C, H, W) per sample, got shape {feature_shape}")


def per_sample_tau(x: torch.Tensor, y: torch.Tensor, rows_per_chunk: int = 1 << 14) -> torch.Tensor:
    """τ-b per sample between logits x and y of shape (B, K) or (B, K, H, W): for maps the mean of the
    pixels' τ over each image (the authors' NYU rule), computed in chunks of pixels (O(K²) pairs each)."""
    rows_x = x.movedim(1, -1).reshape(-1, x.shape[1])
    rows_y = y.movedim(1, -1).reshape(-1, y.shape[1])
    tau = torch.cat([kendall_tau_b(a, b) for a, b in zip(rows_x.split(rows_per_chunk), rows_y.split(rows_per_chunk))])
    return tau.reshape(len(x), -1).mean(dim=1)


def kendall_tau_b(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's τ-b between rows of x and y (B, K), over the K entries of each row, vectorised.

    Over the n0 = K(K−1)/2 pairs i < j: C − D = Σ sign(x_i − x_j)·sign(y_i − y_j); n1, n2 = pairs tied in
    x, in y; τ_b = (C − D) / sqrt((n0 − n1)(n0 − n2)) (scipy's default `kendalltau`; the authors'
    `batch_kendall_tau_gpu`). A row that is constant in x or y has no defined τ: it gets 0 here (the
    authors' 1e-8 in the denominator gives 0 too), so it never passes a threshold krc ≥ 0."""
    k = x.shape[1]
    i, j = torch.triu_indices(k, k, offset=1, device=x.device)
    sign_x = torch.sign(x[:, i] - x[:, j])
    sign_y = torch.sign(y[:, i] - y[:, j])
    concordance = (sign_x * sign_y).sum(dim=1)
    n0 = i.numel()
    untied_x = (n0 - (sign_x == 0).sum(dim=1)).to(x.dtype)
    untied_y = (n0 - (sign_y == 0).sum(dim=1)).to(x.dtype)
    denominator = torch.sqrt(untied_x * untied_y)
    return torch.where(denominator > 0, concordance / denominator.clamp_min(1e-12), torch.zeros_like(denominator))


def non_target_kl(learner_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-prediction KL(softmax(z_target ⊙ m) ‖ softmax(z_learner ⊙ m)), summed over classes, m = 1 −
    onehot(y), target detached (the authors' and official `ntkl`, T = 1). The ground-truth logit is
    ZEROED, not removed, so it stays in both softmaxes with logit 0. Returns shape (B,), or (B, H, W) for
    dense logits, whose labels must be class ids (void as its class, as the authors)."""
    keep = 1.0 - F.one_hot(labels, learner_logits.shape[1]).movedim(-1, 1).to(learner_logits.dtype)
    log_p_learner = F.log_softmax(learner_logits * keep, dim=1)
    p_target = F.softmax(target_logits.detach() * keep, dim=1)
    return F.kl_div(log_p_learner, p_target, reduction="none").sum(dim=1)


def masked_non_target_kl(learner_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor, dense_mask: str = "authors") -> torch.Tensor:
    """(1/B) Σ_b mask_b · ntkl_b: the masked-out samples still count in the denominator (authors' `ntkl`).
    With an all-zero mask this is exactly 0 with zero gradients, which is what the authors' explicit
    `mask.sum() == 0` branch returns; no branch here, so no host-device synchronisation. Dense logits: the
    per-pixel mean over the batch, each image weighted by its mask (`per_image`) or, as the authors'
    `ntkl_ss` (`authors`), all of them whenever any image passes."""
    per_prediction = non_target_kl(learner_logits, target_logits, labels)
    if per_prediction.ndim == 1 or dense_mask == "per_image":
        weights = mask.reshape(-1, *(1,) * (per_prediction.ndim - 1))
    else:
        weights = mask.amax().expand(len(mask)).reshape(-1, *(1,) * (per_prediction.ndim - 1))
    return (weights * per_prediction).mean()


def mutual_kl(network_logits: torch.Tensor, proxy_logits: torch.Tensor) -> torch.Tensor:
    """KL(sg z ‖ q) + KL(sg q ‖ z), each batchmean at T = 1: a network and its proxy distil each other."""
    return hinton_kd_loss(proxy_logits, network_logits, 1.0) + hinton_kd_loss(network_logits, proxy_logits, 1.0)


def poly_lr(base: float, floor: float, power: float, progress: float) -> float:
    """floor + (base − floor)·(1 − progress)^power, progress ∈ [0, 1] (official C²KD `adjust_lr`)."""
    return floor + (base - floor) * (1.0 - min(max(progress, 0.0), 1.0)) ** power


@register
class C2KD(DistillationMethod):
    """L = CE(z_t, y) + CE(z_s, y) + [KL(sg z_t‖q_t) + KL(sg q_t‖z_t)] + [KL(sg z_s‖q_s) + KL(sg q_s‖z_s)]
    + (1/B) Σ_b mask_b·[ntkl_b(q_s ← sg q_t) + ntkl_b(q_t ← sg q_s)], mask_b = [τ_b(sg q_t, sg q_s) > krc],
    all weights 1, T = 1 (baselines-spec.md §2.10; Huo et al., CVPR 2024, and their official code).
    z: network logits; q: proxy logits on the tapped features. The CM teacher is fine-tuned jointly (not
    frozen, never cached)."""

    name = "c2kd"
    segmentation = True
    display_name = "C²KD"
    table_order = 90
    teacher_configs = ("cm",)
    params_type = C2KDParams

    def __init__(self, student: Network, teacher: Network, teacher_tap: str, student_tap: str,
                 proxy_teacher: nn.Module, proxy_student: nn.Module, lr: float = 0.01, momentum: float = 0.9,
                 krc: float = 0.0, lr_schedule: str = "constant", poly_power: float = 0.9,
                 poly_min_lr: float = 1e-4, selection: str = "val_loss", selection_start: float = 0.8,
                 dense_mask: str = "authors", ignore_label: int | None = None) -> None:
        super().__init__(student)
        # Trained, not frozen (Q11): train mode, gradients, in the optimiser.
        self.teacher = teacher.requires_grad_(True)
        self.proxy_teacher = proxy_teacher
        self.proxy_student = proxy_student
        self.teacher_taps = FeatureTaps(teacher.body, [teacher_tap])
        self.student_taps = FeatureTaps(student.body, [student_tap])
        self.teacher_tap, self.student_tap = teacher_tap, student_tap
        self.lr, self.momentum, self.krc = lr, momentum, krc
        self.lr_schedule, self.poly_power, self.poly_min_lr = lr_schedule, poly_power, poly_min_lr
        self.selection, self.selection_start = selection, selection_start
        self.dense_mask, self.ignore_label = dense_mask, ignore_label
        self._optimizer: torch.optim.Optimizer | None = None
        self._epochs: int | None = None
        self._batches_per_epoch: int | None = None
        self._epoch_seen, self._iteration = -1, 0

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "C2KD":
        p = setup.method_params
        taps = pair_entry(p.taps, setup.teacher, setup.student, "c2kd.taps")
        teacher_shape = probe_shapes(setup.teacher, [taps.teacher], setup.sample)[taps.teacher]
        student_shape = probe_shapes(setup.student, [taps.student], setup.sample)[taps.student]
        # the authors build px_t before px_s (get_C2KDmodules); same order, same RNG draws
        output_shape = (setup.num_classes, *setup.sample["y"].shape[1:])
        proxy_teacher = build_proxy(teacher_shape, setup.num_classes, output_shape).to(setup.sample["y"].device)
        proxy_student = build_proxy(student_shape, setup.num_classes, output_shape).to(setup.sample["y"].device)
        return cls(setup.student, setup.teacher, taps.teacher, taps.student, proxy_teacher, proxy_student,
                   lr=p.lr, momentum=p.momentum, krc=p.krc, lr_schedule=p.lr_schedule, poly_power=p.poly_power,
                   poly_min_lr=p.poly_min_lr, selection=p.selection, selection_start=p.selection_start,
                   dense_mask=p.dense_mask, ignore_label=dataset_spec(setup.dataset).ignore_label)

    def prepare(self, context: RunContext) -> None:
        # Nothing is cached: the teacher is trained (and its proxy's BN uses batch statistics), so its
        # outputs differ every step. Only the schedule's length is recorded here.
        self._epochs = context.epochs
        self._batches_per_epoch = math.ceil(len(context.split["train"]) / context.batch_size)

    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """SGD(C²KD's own lr, momentum, no weight decay) over teacher + student + both proxies; the engine's
        `lr` is not used (the authors: lr 0.01 for C²KD whatever the dataset's Adam lr)."""
        self._optimizer = torch.optim.SGD(list(self.trainable_parameters()), lr=self.lr, momentum=self.momentum,
                                          weight_decay=0.0)
        return self._optimizer

    def lr_at(self, epoch: int, iteration: int = 0) -> float:
        """The learning rate of `iteration` (0-based, within 0-based `epoch`). `poly` advances the decay every
        iteration; the official code writes it after every step but from the epoch number, i.e. in steps of
        one epoch — the same curve up to that granularity."""
        if self.lr_schedule == "constant":
            return self.lr
        if self._epochs is None or self._batches_per_epoch is None:
            raise RuntimeError("C2KD.prepare() must run before the poly learning-rate schedule is read")
        progress = (epoch * self._batches_per_epoch + iteration) / (self._epochs * self._batches_per_epoch)
        return poly_lr(self.lr, self.poly_min_lr, self.poly_power, progress)

    def _advance_schedule(self, epoch: int) -> None:
        if epoch != self._epoch_seen:
            self._epoch_seen, self._iteration = epoch, 0
        if self._optimizer is not None and self.lr_schedule != "constant":
            lr = self.lr_at(epoch, self._iteration)
            for group in self._optimizer.param_groups:
                group["lr"] = lr
        self._iteration += 1

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        self._advance_schedule(epoch)
        with self.teacher_taps, self.student_taps:
            teacher_logits = self.teacher(batch)
            student_logits = self.student(batch)
        proxy_t = self.proxy_teacher(self.teacher_taps.outputs.pop(self.teacher_tap))
        proxy_s = self.proxy_student(self.student_taps.outputs.pop(self.student_tap))
        y = batch["y"]
        # the non-target KL zeroes the true class's logit; a void pixel's class is the ignored one (authors)
        classes = y if self.ignore_label is None else torch.where(y == IGNORE, self.ignore_label, y)
        mask = (per_sample_tau(proxy_t.detach(), proxy_s.detach()) > self.krc).to(proxy_s.dtype)
        return {"ce_teacher": F.cross_entropy(teacher_logits, y),
                "ce_student": F.cross_entropy(student_logits, y),
                "kl_teacher_proxy": mutual_kl(teacher_logits, proxy_t),
                "kl_student_proxy": mutual_kl(student_logits, proxy_s),
                "ntkl": (masked_non_target_kl(proxy_s, proxy_t, classes, mask, self.dense_mask)
                         + masked_non_target_kl(proxy_t, proxy_s, classes, mask, self.dense_mask))}

    def validation_score(self, context: RunContext, epoch: int) -> float | None:
        """None (the engine's min val CE) by default; `late_val_accuracy`: −(val accuracy) from epoch
        ⌊selection_start·epochs⌋ on, +∞ before. A tiny epoch bonus makes ties go to the later epoch, as the
        official `val_acc >= best` (accuracy steps are 1/n_val, far above the bonus)."""
        if self.selection == "val_loss":
            return None
        if epoch < math.floor(self.selection_start * context.epochs):
            return math.inf
        accuracy = context.evaluate(self.student, "val").accuracy
        return -accuracy - 1e-9 * epoch

    def epoch_values(self, epoch: int) -> dict[str, float]:
        if self.lr_schedule == "poly" and self._epochs is None:
            return {}
        return {"lr": self.lr_at(epoch, 0)}
