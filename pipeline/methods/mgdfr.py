"""MGDFR, the modality-general decisive features of MFH (Xue et al., ICLR 2023), as the authors run it
(baselines-spec.md §2.9, §3, Q11). Cross-modal teacher only.

Phase `co_training`: a fresh teacher of the other modality and a fresh student are trained together on
CE_t + CE_s + MSE(z_t, z_s), no detach, one SGD(co_lr, momentum 0.9); the last epoch is kept. The teachers-
stage checkpoint is not used (Q11). Then, once, the salience: the salience of teacher feature i is the mean over
repeats and training batches of MSE(z_t with feature i permuted across the batch, z_s), min-max normalised.
Phase `main`: KD into a fresh student from the co-trained teacher. By default the teacher is not masked, as in
the authors' code (baselines quirk Q13: their hook ignores the mode 'freeze' it is given); with `masking: freeze`
its lowest-salience `ratio` of features are replaced by their batch mean in every teacher forward (MFH's intent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.data.tensors import Batch
from pipeline.methods.common.alpha import AlphaParams
from pipeline.methods.common.base import DistillationMethod, MethodSetup, register
from pipeline.methods.common.features import PairTable, check_pair_table, pair_entry, probe_shapes
from pipeline.methods.common.kl import hinton_kd_loss, softened_kl
from pipeline.models.registry import Network
from pipeline.models.taps import FeatureTaps
from pipeline.params import POSITIVE
from pipeline.training.phases import Phase, RunContext

CO_MOMENTUM = 0.9  # the authors' and the official MFH co-training SGD momentum
# Rows × per-row elements of the expanded tap tensor in one fast-salience forward (16 MB of float32): large
# enough to amortise the per-forward overhead, small enough to stay cache-friendly and far below KD's memory.
SALIENCE_CHUNK_ELEMENTS = 1 << 22


def _all(predicate: Callable[[int], bool]) -> Callable[[dict], bool]:
    return lambda mapping: all(predicate(v) for v in mapping.values())


@dataclass(frozen=True)
class MGDFRParams:
    """MGDFR as the authors run it. `teachers`: only `cm` (the authors' script needs a unimodal teacher).

    `co_epochs` (authors 100), `repeat_permute` (authors 10) and `salience_batch_multiplier` (salience batch
    = multiplier × training batch; authors 6) per dataset; `co_lr`: co-training SGD lr (authors 1e-3;
    official MFH 1e-2). `ratio`: the fraction of teacher features (lowest salience) frozen to their batch mean
    (0.75) when `masking` is `freeze`. Switch `masking`: default `none` = what the authors' code does (baselines
    quirk Q13: `main-MGDFR.py` asks its hook builder for mode 'freeze', whose hook handles only 'zero' and
    'permute', so the teacher is never masked; the salience is still computed); `freeze` = MFH's intent,
    the lowest-salience `ratio` of features frozen to their batch mean. `taps`: per teacher architecture, per
    student architecture, the teacher module whose output features are ranked. The main phase = KD
    (`temperature`, `alpha`, as `kd`).
    Switch `kd_form`: default `authors` ((1 − α)·CE + α·T²·KL, T = `temperature`, α-sched); `official` (MFH's
    code): KL(p_t ‖ p_s) at T = 1 only, no CE (batchmean; MFH's KLDivLoss 'mean' only divides by C more).
    Switch `salience`: default `all_batches` (authors: accumulated over every salience batch); `last_batch`
    (official MFH: overwritten per batch, so only the last batch counts).
    `salience_taps`: per architecture pair, where the salience permutation is applied: the tap itself or a
    later module with exactly the same salience (only per-channel, row-wise operations in between; checked
    at run time). For ThreeLayerCNN-A, `conv3_maxpool` (after ReLU and 2×2 max-pool) equals `conv3` and makes
    the salience ~15× cheaper (the layers after the permutation point run on repeats × D × n_train rows).
    Switch `dense_logits` (segmentation only): default `authors` = baselines quirk Q6, the co-training MSE
    and the salience compare only the first sample's last class channel of the (B, C, H, W) outputs;
    `whole`: the whole outputs, as on classification."""

    teachers: list[str]
    temperature: float = field(metadata=POSITIVE)
    alpha: AlphaParams
    kd_form: Literal["authors", "official"]
    co_lr: float = field(metadata=POSITIVE)
    co_epochs: dict[str, int] = field(metadata={"check": (_all(lambda v: v > 0), "integers > 0 per dataset")})
    repeat_permute: dict[str, int] = field(metadata={"check": (_all(lambda v: v > 0), "integers > 0 per dataset")})
    salience_batch_multiplier: dict[str, int] = field(metadata={"check": (_all(lambda v: v > 0),
                                                                          "integers > 0 per dataset")})
    salience: Literal["all_batches", "last_batch"]
    ratio: float = field(metadata={"check": (lambda v: 0 <= v < 1, "a number in [0, 1)")})
    masking: Literal["none", "freeze"]
    dense_logits: Literal["authors", "whole"]
    taps: PairTable[str]
    salience_taps: PairTable[str]

    def validate(self) -> None:
        check_pair_table(self.taps, "taps", lambda name: [("teacher", name)])
        check_pair_table(self.salience_taps, "salience_taps", lambda name: [("teacher", name)])


def compared_logits(logits: torch.Tensor, dense_logits: str = "authors") -> torch.Tensor:
    """The logits MGDFR's MSE terms compare: all of them; of dense (B, C, H, W) outputs under `authors`, the
    first sample's last class channel only (the authors' NYU code, baselines quirk Q6)."""
    return logits[0, -1] if logits.ndim > 2 and dense_logits == "authors" else logits


def co_training_terms(teacher: Network, student: Network, batch: Batch,
                      dense_logits: str = "authors") -> dict[str, torch.Tensor]:
    """Co-training: CE(z_t, y), CE(z_s, y) and MSE(z_t, z_s) (mean reduction, gradients to both networks;
    MFH co-training, baselines-spec.md §2.9; z as `compared_logits`)."""
    z_t, z_s = teacher(batch), student(batch)
    return {"ce_teacher": F.cross_entropy(z_t, batch["y"]), "ce_student": F.cross_entropy(z_s, batch["y"]),
            "mse": F.mse_loss(compared_logits(z_t, dense_logits), compared_logits(z_s, dense_logits))}


def draw_permutations(features: int, rows: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One random permutation of `rows` per feature, as a (features, rows) index tensor."""
    return torch.rand(features, rows, generator=generator).argsort(dim=1).to(device)


def permute_feature(x: torch.Tensor, feature: int, permutation: torch.Tensor) -> torch.Tensor:
    """`x` with feature (channel) `feature` permuted across the batch: y[:, i] = x[perm, i] (authors'
    `my_permute_new`; a conv channel moves as a whole map)."""
    y = x.clone()
    y[:, feature] = x[permutation, feature]
    return y


def permuted_copies(x: torch.Tensor, features: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """K = len(features) stacked copies of `x` (B, D, ...), copy k with feature features[k] permuted by
    permutations[k]: shape (K·B, D, ...), block k equal to `permute_feature(x, features[k], permutations[k])`."""
    k, rows = permutations.shape
    y = x.unsqueeze(0).expand(k, *x.shape).clone()
    blocks = torch.arange(k, device=x.device)[:, None]
    y[blocks, torch.arange(rows, device=x.device)[None, :], features[:, None]] = x[permutations, features[:, None]]
    return y.reshape(k * rows, *x.shape[1:])


def freeze_features(x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`x` with the given features (channels) replaced by their mean over the batch, per position (authors'
    `my_freeze_new`: mean over dim 0 only)."""
    y = x.clone()
    y[:, features] = x[:, features].mean(dim=0, keepdim=True)
    return y


def min_max_normalise(values: torch.Tensor) -> torch.Tensor:
    """(v − min) / (max − min); all zeros when every value is equal."""
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def _forward_replacing(network: Network, tap: str, batch: Batch,
                       replace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logits of `network` on `batch` with the output of module `tap` replaced by `replace(output)`."""
    handle = network.body.get_submodule(tap).register_forward_hook(lambda _m, _i, out: replace(out))
    try:
        return network(batch)
    finally:
        handle.remove()


def _tap_output(network: Network, tap: str, batch: Batch) -> torch.Tensor:
    with FeatureTaps(network.body, [tap]) as taps:
        network(batch)
        return taps[tap]


@torch.no_grad()
def permutation_salience(teacher: Network, tap: str, batches: Iterable[Batch],
                         reference: Callable[[Batch], torch.Tensor], repeats: int, generator: torch.Generator, *,
                         accumulate: bool = True,
                         definition_tap: str | None = None,
                         chunk_elements: int = SALIENCE_CHUNK_ELEMENTS) -> torch.Tensor:
    """Raw salience of each feature of `teacher`'s tap (before normalisation): mean over `repeats` of
    Σ_batches MSE(z_t with feature i permuted across the batch, reference(batch)) (`accumulate`; else only
    the last batch's value). Constant factors (1/n_train, 1/repeats) are left out: they cancel in the
    min-max normalisation.

    Exactly the per-feature definition (`naive_permutation_salience`, same permutations) but fast: the tap
    output of a batch is computed once; each forward then feeds a 1-row stub through the layers before
    the tap and replaces the tap output by K stacked copies of the batch's tap output, copy k with one
    feature permuted, so only the layers after the tap run, on K·B rows. This needs those layers to act
    row by row without reading earlier tensors (true of the sequential unimodal teachers); the first
    block is checked against a full forward and a mismatch is an error.

    `definition_tap` (default `tap`): the module where the salience is defined, when the permutation is
    applied at a later, equivalent `tap` (only per-channel, row-wise operations in between, e.g. ReLU and
    max-pooling: permuting a channel across the batch commutes with them). The check forward permutes at
    `definition_tap`, so it also verifies that equivalence."""
    teacher.eval()
    total = None
    checked = False
    for batch in batches:
        target = reference(batch)
        h = _tap_output(teacher, tap, batch)
        rows, features = h.shape[:2]
        chunk = max(1, chunk_elements // h.numel())
        stub = {key: value[:1] for key, value in batch.items()}
        scores = torch.empty(repeats, features, device=h.device)
        for r in range(repeats):
            permutations = draw_permutations(features, rows, generator, h.device)
            for start in range(0, features, chunk):
                index = torch.arange(start, min(start + chunk, features), device=h.device)
                copies = permuted_copies(h, index, permutations[index])
                logits = _forward_replacing(teacher, tap, stub, lambda _out, copies=copies: copies)
                if logits.shape[0] != len(index) * rows:
                    raise RuntimeError(f"fast MGDFR salience: the layers after {tap!r} do not keep the rows of "
                                       f"the tap output ({logits.shape[0]} rows, expected {len(index) * rows})")
                logits = logits.reshape(len(index), rows, -1)
                if not checked:
                    i = int(index[0])
                    full = _forward_replacing(teacher, definition_tap or tap, batch,
                                              lambda out, i=i, p=permutations[i]: permute_feature(out, i, p))
                    if not torch.allclose(full, logits[0], rtol=1e-4, atol=1e-5):
                        raise RuntimeError(f"fast MGDFR salience is not exact for {teacher.arch}: the layers after "
                                           f"{tap!r} mix rows or read tensors computed before it, or permuting at "
                                           f"{tap!r} is not equivalent to permuting at {definition_tap or tap!r}")
                    checked = True
                scores[r, index] = (logits - target).pow(2).mean(dim=(1, 2))
        total = scores if total is None or not accumulate else total + scores
    if total is None:
        raise ValueError("MGDFR salience needs at least one training batch")
    return total.mean(dim=0)


@torch.no_grad()
def naive_permutation_salience(teacher: Network, tap: str, batches: Iterable[Batch],
                               reference: Callable[[Batch], torch.Tensor], repeats: int, generator: torch.Generator,
                               *, accumulate: bool = True, dense_logits: str = "authors") -> torch.Tensor:
    """The authors' loop: one full teacher forward per (batch, repeat, feature); same value and the same
    random draws as `permutation_salience`, kept as its reference, and used where the fast path cannot
    apply (FuseNet: its decoder unpools with encoder indices computed before the tap)."""
    teacher.eval()
    total = None
    for batch in batches:
        target = reference(batch)
        rows, features = _tap_output(teacher, tap, batch).shape[:2]
        scores = torch.empty(repeats, features, device=target.device)
        for r in range(repeats):
            permutations = draw_permutations(features, rows, generator, target.device)
            for i in range(features):
                logits = _forward_replacing(teacher, tap, batch,
                                            lambda out, i=i, p=permutations[i]: permute_feature(out, i, p))
                scores[r, i] = F.mse_loss(compared_logits(logits, dense_logits), compared_logits(target, dense_logits))
        total = scores if total is None or not accumulate else total + scores
    return total.mean(dim=0)


@register
class MGDFR(DistillationMethod):
    """Co-train a fresh cross-modal teacher with a student, rank the teacher's features by permutation
    salience, then distil into a fresh student from the teacher with its low-salience features frozen."""

    name = "mgdfr"
    segmentation = True
    display_name = "MGDFR"
    table_order = 80
    teacher_configs = ("cm",)
    params_type = MGDFRParams

    def __init__(self, student: Network, teacher: Network, co_student: Network, tap: str, *,
                 salience_tap: str | None = None, temperature: float,
                 alpha: AlphaParams, kd_form: str = "authors", co_lr: float = 1e-3, co_epochs: int = 100,
                 repeats: int = 10, salience_batch_multiplier: int = 6, salience: str = "all_batches",
                 ratio: float = 0.75, masking: str = "none", dense_logits: str = "authors") -> None:
        super().__init__(student)
        # co-training trains `teacher` and `co_student`; both leave the optimised set before the main phase
        self.teacher = teacher
        self.co_student: Network | None = co_student
        self.tap = tap
        self.salience_tap = salience_tap or tap
        self.temperature = temperature
        self.alpha = alpha
        self.kd_form = kd_form
        self.co_lr = co_lr
        self.co_epochs = co_epochs
        self.repeats = repeats
        self.salience_batch_multiplier = salience_batch_multiplier
        self.salience_mode = salience
        self.ratio = ratio
        self.masking = masking
        self.dense_logits = dense_logits
        self.salience: torch.Tensor | None = None
        self.register_buffer("frozen_features", torch.empty(0, dtype=torch.long))
        self._freeze_handle = None

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "MGDFR":
        p = setup.method_params
        for block in ("co_epochs", "repeat_permute", "salience_batch_multiplier"):
            if setup.dataset not in getattr(p, block):
                raise KeyError(f"mgdfr.{block}.{setup.dataset} is missing")
        # Q11: MGDFR's teacher is co-trained from scratch; the teachers-stage checkpoint is not used
        teacher, co_student = setup.build_network(setup.other), setup.build_network(setup.target)
        tap = pair_entry(p.taps, teacher, setup.student, "mgdfr.taps")
        salience_tap = pair_entry(p.salience_taps, teacher, setup.student, "mgdfr.salience_taps")
        shapes = probe_shapes(teacher, [tap, salience_tap], setup.sample)
        if shapes[tap][0] != shapes[salience_tap][0]:
            raise ValueError(f"mgdfr.salience_taps.{teacher.arch}.{setup.student.arch}: {salience_tap!r} has "
                             f"{shapes[salience_tap][0]} features but tap {tap!r} has {shapes[tap][0]}")
        return cls(setup.student, teacher, co_student, tap, salience_tap=salience_tap, temperature=p.temperature,
                   alpha=p.alpha, kd_form=p.kd_form, co_lr=p.co_lr, co_epochs=p.co_epochs[setup.dataset],
                   repeats=p.repeat_permute[setup.dataset], salience=p.salience, ratio=p.ratio, masking=p.masking,
                   dense_logits=p.dense_logits,
                   salience_batch_multiplier=p.salience_batch_multiplier[setup.dataset])

    def phases(self, context: RunContext) -> list[Phase]:
        return [self.co_training_phase(), self.main_phase(context)]

    def co_training_phase(self) -> Phase:
        """CE_t + CE_s + MSE(z_t, z_s) over the fresh teacher and co-student, one SGD(co_lr, momentum 0.9); the
        last epoch is kept (no selection, as MFH)."""
        networks = (self.teacher, self.co_student)
        return Phase("co_training", self.co_epochs,
                     lambda batch, epoch: co_training_terms(self.teacher, self.co_student, batch, self.dense_logits),
                     lambda: torch.optim.SGD([p for net in networks for p in net.parameters()], lr=self.co_lr,
                                             momentum=CO_MOMENTUM),
                     train_modules=networks)

    def _compute_salience(self, context: RunContext) -> torch.Tensor:
        self.co_student.eval()
        batches = context.batches("train", self.salience_batch_multiplier * context.batch_size, shuffle=True)
        accumulate = self.salience_mode == "all_batches"
        if self.teacher_is_row_wise(context):
            raw = permutation_salience(self.teacher, self.salience_tap, batches, self.co_student, self.repeats,
                                       context.generator, accumulate=accumulate, definition_tap=self.tap)
        else:
            raw = naive_permutation_salience(self.teacher, self.tap, batches, self.co_student, self.repeats,
                                             context.generator, accumulate=accumulate, dense_logits=self.dense_logits)
        return min_max_normalise(raw)

    def teacher_is_row_wise(self, context: RunContext) -> bool:
        """Whether the fast salience applies: the layers after the tap act row by row on the tap output alone
        (probed on two training samples, outside the run's random stream). FuseNet's decoder unpools with
        encoder indices computed before the tap, so its salience takes the authors' loop."""
        self.teacher.eval()   # no dropout draw, no BatchNorm statistics update from the probe
        with torch.no_grad():
            if self.teacher(context.data.batch(context.split["train"][:1])).ndim == 2:
                return True
        probe = context.data.batch(context.split["train"][:2])
        try:
            with torch.random.fork_rng(devices=[]):
                permutation_salience(self.teacher, self.salience_tap, [probe], self.co_student, 1,
                                     torch.Generator().manual_seed(0), definition_tap=self.tap)
        except RuntimeError:
            return False
        return True

    def prepare(self, context: RunContext) -> None:
        """Between the phases: rank the co-trained teacher's features by salience, freeze the teacher and
        hook the freezing of its lowest-salience `ratio` of features into every teacher forward."""
        self.salience = self._compute_salience(context)
        self.co_student = None
        self.freeze(self.teacher)
        for p in self.teacher.parameters():  # co-training's last gradients must not linger on a frozen teacher
            p.grad = None
        order = torch.argsort(self.salience, stable=True)
        n_frozen = int(self.ratio * len(order)) if self.masking == "freeze" else 0  # `none`: the authors' code
        self.frozen_features = order[:n_frozen].to(self.salience.device)
        if n_frozen == 0:
            return
        tap = self.teacher.body.get_submodule(self.tap)
        self._freeze_handle = tap.register_forward_hook(lambda _m, _i, out: freeze_features(out, self.frozen_features))

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The co-trained teacher's logits with the low-salience features frozen to this batch's mean.
        Not cacheable: the batch mean depends on which samples share the batch."""
        with torch.no_grad():
            return self.teacher(batch)

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        logits = self.student(batch)
        teacher_logits = self.teacher_logits(batch)
        if self.kd_form == "official":  # MFH: KL only, T = 1
            return {"kd": softened_kl(logits, teacher_logits, 1.0)}
        return self.alpha.weigh(epoch, F.cross_entropy(logits, batch["y"]),
                                {"kd": hinton_kd_loss(logits, teacher_logits, self.temperature)})

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.alpha.epoch_values(epoch) if self.kd_form == "authors" else {}
