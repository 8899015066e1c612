"""FitNets (Romero et al., ICLR 2015) in two phases, as the authors run it (baselines-spec.md §2.4, §3, Q4, Q5).

Phase `hint`: for two hint pairs per teacher/student pair, a small regressor maps a student tap onto a
frozen teacher tap; L_hint = Σ_pairs MSE(regressor(f_s), sg f_t). Adam(hint_lr) over the regressors and
only the hinted student layers (Q4). The student state with the lowest mean validation hint loss is kept;
the regressors are then discarded. Phase `main`: Hinton KD exactly as `kd` ((1 − α)·CE + α·T²·KL, T = 4,
α halved every 30 epochs), selected on the validation (1 − α)·CE + α·KD (Q5).
"""

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
from pipeline.methods.common.features import PairTable, check_pair_table, pair_entry, probe_shapes
from pipeline.methods.common.frozen import FrozenOutputs
from pipeline.methods.common.kl import hinton_kd_loss
from pipeline.models.registry import Network
from pipeline.models.taps import FeatureTaps
from pipeline.params import POSITIVE, check
from pipeline.training.phases import Phase, RunContext

RegressorKind = Literal["r1d", "r2d_to_1d", "down", "same", "up"]

# A hint-tap table larger than this is not cached (recomputed per batch instead, which is exactly
# equivalent): AV-MNIST's 64×56×56 teacher taps over 70,000 samples would need ~56 GB.
HINT_CACHE_LIMIT_BYTES = 1 << 30


def _non_negative_values(mapping: dict) -> bool:
    return all(v >= 0 for v in mapping.values())


@dataclass(frozen=True)
class HintPair:
    """One hint: teacher tap `teacher` ← regressor `regressor`(student tap `student`)."""

    teacher: str
    student: str
    regressor: RegressorKind


@dataclass(frozen=True)
class FitNetsParams:
    """FitNets as the authors run it. The main phase = KD (`temperature`, `alpha` as in `kd`).

    `hint_epochs`: hint-phase epochs per dataset (authors 100). `hint_lr`: hint-phase Adam lr (authors 1e-3).
    `taps`: per teacher architecture, per student architecture, the hint pairs.
    Switch `hint_scope`: default `tapped_layers` (authors, Q4: only student parameters whose name contains a
    student tap name); `trunk` (torchdistill's multi-stage FitNets): every student parameter up to and
    including the last tapped module in forward order.
    Switch `selection`: default `combined` (authors, Q5: min val (1 − α)·CE + α·KD at the current α);
    `ce`: the engine's usual rule (min val CE)."""

    teachers: list[str]
    temperature: float = field(metadata=POSITIVE)
    alpha: AlphaParams
    hint_lr: float = field(metadata=POSITIVE)
    hint_epochs: dict[str, int] = field(metadata=check(_non_negative_values, "integers >= 0 per dataset"))
    hint_scope: Literal["tapped_layers", "trunk"]
    selection: Literal["combined", "ce"]
    taps: PairTable[list[HintPair]]

    def validate(self) -> None:
        check_pair_table(self.taps, "taps", lambda pairs: [(side, getattr(h, side)) for h in pairs
                                                           for side in ("teacher", "student")])


class Regressor1D(nn.Module):
    """The authors' `R1D`: the flattened feature as a 1-channel sequence through Conv1d(1→1, k3, p1,
    stride max(L_in // L_out, 1)), then nearest resizing to L_out (4 parameters)."""

    def __init__(self, length_in: int, length_out: int) -> None:
        super().__init__()
        self.length_out = length_out
        self.conv = nn.Conv1d(1, 1, kernel_size=3, stride=max(length_in // length_out, 1), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.flatten(1).unsqueeze(1))
        return F.interpolate(y, size=self.length_out, mode="nearest").squeeze(1)


class Regressor2DTo1D(nn.Module):
    """The authors' `R2D→1D`: Conv2d(C_in→16, k3, p1), flatten, Linear(16·H·W → L_out)."""

    def __init__(self, shape_in: tuple[int, ...], length_out: int) -> None:
        super().__init__()
        channels, height, width = shape_in
        self.conv = nn.Conv2d(channels, 16, kernel_size=3, padding=1)
        self.fc = nn.Linear(16 * height * width, length_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


# per spatial side, for the 2-D kinds (kernel 3, padding 1): the output size for an input size, and the input
# size giving an output size (None where none does)
_OUTPUT_SIDE = {"down": lambda n: (n + 1) // 2, "same": lambda n: n, "up": lambda n: 2 * n}
_INPUT_SIDE = {"down": lambda n: 2 * n, "same": lambda n: n, "up": lambda n: n // 2 if n % 2 == 0 else None}


class HintRegressor(nn.Module):
    """A regressor of kind `kind` from a student tap of per-sample shape `shape_in` to a teacher tap of
    shape `shape_out`; its output always has the teacher tap's shape.

    AV-Digits adaptation of the 2-D kinds (`down`, `same`, `up`): where the regressor's output resolution
    would differ from the teacher tap's (16×16 spectrograms: `down` of audio conv2 8×8 gives 4×4 against
    LeNet5 conv1 28×28; `up` of LeNet5 conv1 28×28 gives 56×56 against audio conv2 8×8), the maps are
    matched by nearest interpolation at the low-resolution end, so no convolution is computed only to be
    thrown away: a too-large output is avoided by first shrinking the student map to the size that gives
    the teacher's exactly (`up`: 28×28 → 4×4 → 8×8); a too-small output is enlarged afterwards (`down`:
    4×4 → 28×28). With the authors' AV-MNIST shapes the resolutions agree and nothing is resized."""

    def __init__(self, kind: str, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> None:
        super().__init__()
        self.shape_out = tuple(shape_out)
        self.input_size: tuple[int, ...] | None = None
        if kind == "r1d":
            self.body = Regressor1D(math.prod(shape_in), math.prod(shape_out))
        elif kind == "r2d_to_1d":
            _need_maps(kind, "student", shape_in)
            self.body = Regressor2DTo1D(shape_in, math.prod(shape_out))
        else:
            _need_maps(kind, "student", shape_in)
            _need_maps(kind, "teacher", shape_out)
            c_in, c_out = shape_in[0], shape_out[0]
            self.body = {"down": lambda: nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                         "same": lambda: nn.Conv2d(c_in, c_out, 3, stride=1, padding=1),
                         "up": lambda: nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
                         }[kind]()
            native = tuple(_OUTPUT_SIDE[kind](n) for n in shape_in[1:])
            wanted = tuple(_INPUT_SIDE[kind](n) for n in shape_out[1:])
            if math.prod(native) > math.prod(shape_out[1:]) and None not in wanted:
                self.input_size = wanted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None:
            x = F.interpolate(x, size=self.input_size, mode="nearest")
        y = self.body(x)
        if y.dim() == 4 and tuple(y.shape[-2:]) != self.shape_out[-2:]:
            y = F.interpolate(y, size=self.shape_out[-2:], mode="nearest")
        return y.reshape(len(x), *self.shape_out)


def _need_maps(kind: str, side: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise ValueError(f"regressor {kind!r} needs a {side} feature map (C, H, W), got per-sample shape {shape}")


def hint_loss(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """L_hint = Σ_pairs MSE(regressor(f_s), sg f_t), mean reduction per pair (FitNets Eq. 3 as the authors'
    `hint_training_loss`, baselines-spec.md §2.4)."""
    return torch.stack([F.mse_loss(p, t.detach()) for p, t in zip(predictions, targets, strict=True)]).sum()


@torch.no_grad()
def trunk_parameter_names(network: Network, names: list[str], sample: Batch) -> set[str]:
    """Names of the parameters of every module of `network.body` whose forward completes no later than the
    last of the modules `names` (torchdistill's "trunk up to the hint")."""
    order: dict[str, int] = {}

    def record(name: str):
        def hook(_module, _inputs, _output) -> None:  # returns None: the output is left unchanged
            order.setdefault(name, len(order))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in network.body.named_modules()]
    try:
        device = next(network.parameters()).device
        network({key: value.to(device) for key, value in sample.items()})
    finally:
        for handle in handles:
            handle.remove()
    last = max(order[name] for name in names)
    return {".".join(filter(None, ("body", module_name, param_name)))
            for module_name, module in network.body.named_modules() if order.get(module_name, math.inf) <= last
            for param_name, _ in module.named_parameters(recurse=False)}


@register
class FitNets(DistillationMethod):
    """Phase `hint`: hint training of the hinted student layers through regressors; phase `main`: Hinton KD
    with a frozen teacher (MM or CM), selected on the validation KD objective."""

    name = "fitnets"
    segmentation = True
    display_name = "FitNets"
    table_order = 30
    teacher_configs = ("mm", "cm")
    params_type = FitNetsParams

    def __init__(self, student: Network, teacher: Network, hints: list[HintPair], regressors: list[HintRegressor],
                 guided: set[str], *, temperature: float, alpha: AlphaParams, hint_lr: float, hint_epochs: int,
                 selection: str = "combined", cache_teacher_outputs: bool = True) -> None:
        super().__init__(student)
        self.teacher = self.freeze(teacher)
        self.hints = list(hints)
        self.regressors: nn.ModuleList | None = nn.ModuleList(regressors)
        self.guided = set(guided)
        self.temperature = temperature
        self.alpha = alpha
        self.hint_lr = hint_lr
        self.hint_epochs = hint_epochs
        self.selection = selection
        self.cache = cache_teacher_outputs
        self.teacher_outputs = FrozenOutputs(self.teacher, enabled=cache_teacher_outputs)
        self.hint_targets: FrozenOutputs | None = None
        self._hint_shapes = [r.shape_out for r in regressors]
        self._saved_requires_grad: dict[str, bool] = {}

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "FitNets":
        p = setup.method_params
        hints = pair_entry(p.taps, setup.teacher, setup.student, "fitnets.taps")
        if setup.dataset not in p.hint_epochs:
            raise KeyError(f"fitnets.hint_epochs.{setup.dataset} is missing")
        t_shapes = probe_shapes(setup.teacher, [h.teacher for h in hints], setup.sample)
        s_shapes = probe_shapes(setup.student, [h.student for h in hints], setup.sample)
        regressors = [HintRegressor(h.regressor, s_shapes[h.student], t_shapes[h.teacher]) for h in hints]
        student_taps = [h.student for h in hints]
        if p.hint_scope == "tapped_layers":  # Q4: a substring match on parameter names, as the authors
            guided = {name for name, _ in setup.student.named_parameters() if any(t in name for t in student_taps)}
        else:
            guided = trunk_parameter_names(setup.student, student_taps, setup.sample)
        return cls(setup.student, setup.teacher, hints, regressors, guided, temperature=p.temperature,
                   alpha=p.alpha, hint_lr=p.hint_lr, hint_epochs=p.hint_epochs[setup.dataset],
                   selection=p.selection, cache_teacher_outputs=setup.cache_frozen_outputs)

    def phases(self, context: RunContext) -> list[Phase]:
        main = self.main_phase(context)
        if self.hint_epochs == 0:
            self.regressors = None
            return [main]
        return [self.hint_phase(context), main]

    # ---- phase `hint` ----

    def _teacher_hints(self, batch: Batch) -> torch.Tensor:
        """The teacher's hint taps of `batch`, flattened and concatenated (one cacheable tensor)."""
        names = [h.teacher for h in self.hints]
        with FeatureTaps(self.teacher.body, names) as taps:
            self.teacher(batch)
            return torch.cat([taps[name].flatten(1) for name in names], dim=1)

    def _split_hints(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [math.prod(shape) for shape in self._hint_shapes]
        parts = flat.split(sizes, dim=1)
        return [part.reshape(len(flat), *shape) for part, shape in zip(parts, self._hint_shapes, strict=True)]

    def hint_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The hint-phase loss of one batch, {"hint": Σ_pairs MSE(regressor(f_s), f_t)}."""
        assert self.regressors is not None and self.hint_targets is not None
        with FeatureTaps(self.student.body, [h.student for h in self.hints]) as taps:
            self.student(batch)
            predictions = [reg(taps[h.student]) for reg, h in zip(self.regressors, self.hints, strict=True)]
        return {"hint": hint_loss(predictions, self._split_hints(self.hint_targets(batch)))}

    @torch.no_grad()
    def _val_hint_loss(self, context: RunContext) -> float:
        """Mean over validation batches of the batch hint loss (the authors' per-batch-mean convention)."""
        self.student.eval()
        self.regressors.eval()
        losses = [self.hint_terms(batch)["hint"] for batch in context.batches("val")]
        return torch.stack(losses).mean().item()

    def hint_phase(self, context: RunContext) -> Phase:
        """Adam(hint_lr) over the regressors and the guided student parameters (Q4), selected on the mean
        validation hint loss; the teacher's hint taps are cached for the training and validation samples."""
        train_val = torch.cat([context.split["train"], context.split["val"]])

        def before() -> None:
            table_bytes = len(context.data) * sum(math.prod(s) for s in self._hint_shapes) * 4
            # the teacher is frozen, in eval mode and sees no augmentation: its taps are fixed per sample
            self.hint_targets = FrozenOutputs(self._teacher_hints,
                                              enabled=self.cache and table_bytes <= HINT_CACHE_LIMIT_BYTES)
            self.hint_targets.prepare(context.data, train_val)
            # parameters outside the hint scope are not in the optimiser (Q4); switching their gradients off
            # leaves them untouched and skips their backward
            self._saved_requires_grad = {name: p.requires_grad for name, p in self.student.named_parameters()}
            for name, p in self.student.named_parameters():
                p.requires_grad_(name in self.guided)

        def optimizer() -> torch.optim.Optimizer:
            guided = [p for name, p in self.student.named_parameters() if name in self.guided]
            return torch.optim.Adam([{"params": r.parameters()} for r in self.regressors] + [{"params": guided}],
                                    lr=self.hint_lr)

        def after() -> None:
            for name, p in self.student.named_parameters():
                p.requires_grad_(self._saved_requires_grad[name])
            # the regressors are discarded: the main phase (and its optimiser) sees the student alone
            self.regressors = None
            self.hint_targets = None
            self.student.train()

        return Phase("hint", self.hint_epochs, lambda batch, epoch: self.hint_terms(batch), optimizer,
                     train_modules=[self.student, self.regressors],
                     validate=lambda epoch: {"val_hint": self._val_hint_loss(context)},
                     score=lambda metrics, epoch: metrics["val_hint"], selected=[self.student],
                     before=before, after=after)

    # ---- phase `main`: KD ----

    def prepare(self, context: RunContext) -> None:
        # the teacher is frozen, in eval mode and sees no augmentation: its logits are fixed per sample
        self.teacher_outputs.prepare(context.data, torch.cat([context.split["train"], context.split["val"]]))

    def _kd_terms(self, logits: torch.Tensor, batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        return self.alpha.weigh(epoch, F.cross_entropy(logits, batch["y"]),
                                {"kd": hinton_kd_loss(logits, self.teacher_outputs(batch), self.temperature)})

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        return self._kd_terms(self.student(batch), batch, epoch)

    @torch.no_grad()
    def validation_score(self, context: RunContext, epoch: int) -> float | None:
        """Q5 (authors): mean over validation batches of (1 − α)·CE + α·KD at this epoch's α; `ce`: None."""
        if self.selection == "ce":
            return None
        was_training = self.student.training
        self.student.eval()
        losses = [torch.stack(list(self._kd_terms(self.student(batch), batch, epoch).values())).sum()
                  for batch in context.batches("val")]
        self.student.train(was_training)
        return torch.stack(losses).mean().item()

    def epoch_values(self, epoch: int) -> dict[str, float]:
        return self.alpha.epoch_values(epoch)
