"""The contract every distillation method implements, and the method registry (filled as method modules
are imported; `pipeline.methods.method_class` imports them on demand).

A method owns its math and its extra modules. It declares its training phases (`phases(context)`; by
default one main phase built from the hooks below) and, for each, a mapping of named loss terms with
weights applied; the one training loop (`pipeline/training/engine.py`) runs them. A method never logs,
saves, prints or imports the engine. Frozen teachers are registered with :meth:`DistillationMethod.freeze`,
which keeps them in eval mode, out of the optimiser and without gradients.

Hooks of the main phase, all with working defaults:
- `prepare(context)`: once before the main phase (cache frozen outputs);
- `configure_optimizer(lr)`: the optimiser (default: Adam over every trainable parameter);
- `validation_score(context, epoch)`: the model-selection score (default None: the engine's rule,
  validation cross-entropy of the student, or accuracy with `engine.selection: val_accuracy`);
- `epoch_values(epoch)`: scalars to log per epoch (loss weights, schedules).

A method's own params are a frozen dataclass `params_type`, read from the top-level key of params.yaml
equal to its `name`; its `teachers` field lists the teacher configurations the pipeline runs it with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.data.catalog import DatasetSpec
from pipeline.data.tensors import Batch
from pipeline.models.registry import Network
from pipeline.params import flatten
from pipeline.training.phases import Phase, RunContext

METHODS: dict[str, type["DistillationMethod"]] = {}

TEACHER_CONFIGS = ("mm", "cm", "mm+cm")


def register(cls: type["DistillationMethod"]) -> type["DistillationMethod"]:
    """Class decorator: make a method available under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    unknown = set(cls.teacher_configs) - set(TEACHER_CONFIGS)
    if unknown:
        raise ValueError(f"method {cls.name!r}: unknown teacher configs {sorted(unknown)}; known: {TEACHER_CONFIGS}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type["DistillationMethod"]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_teacher_config(cls: type["DistillationMethod"], config: str) -> None:
    """A clear error when `cls` cannot run with teacher configuration `config`."""
    if config not in cls.teacher_configs:
        raise ValueError(f"method {cls.name!r} does not support teacher config {config!r}; it supports: "
                         f"{', '.join(cls.teacher_configs) or 'none'}")


@dataclass
class MethodSetup:
    """Everything a method is built from for one run (see `DistillationMethod.from_setup`). Every network
    and the sample live on the run's device."""

    student: Network                          # the target modality's network (fresh unless restored)
    teacher: Network | None                   # teachers-stage checkpoint: MM or CM network; None for "mm+cm"
    teacher_config: str                       # "mm", "cm", "mm+cm" or "none"
    target: str                               # batch key of the student: "m1" or "m2" ("mm": the MM network)
    dataset: str                              # dataset key, e.g. "av_digits"
    num_classes: int
    sample: Batch                             # a few training samples, for sizing modules by feature shape
    build_network: Callable[[str], Network]   # a fresh network for a role ("mm", "m1", "m2"), on the device
    method_params: Any                        # the method's own params block (its `params_type`), or None
    cache_frozen_outputs: bool = True         # engine.cache_frozen_outputs
    phase: str | None = None                  # multi-stage methods (MST): the phase this run trains
    setting: str = "default"                  # a named variant of the method (MST's Table 3 settings)
    restored: dict[str, Any] = field(default_factory=dict)  # outputs of earlier DVC stages, by name

    @property
    def other(self) -> str:
        """The other modality's batch key (the CM teacher's input)."""
        return DatasetSpec.other(self.target)


class DistillationMethod(nn.Module):
    """Base class: a student, optional teachers, and the phases the student is trained in."""

    name: ClassVar[str]
    display_name: ClassVar[str] = ""                 # as printed in the tables, e.g. "KD"
    table_order: ClassVar[int] = 1000                # position among Table 1's rows (the paper's order)
    teacher_configs: ClassVar[tuple[str, ...]] = ()  # which teachers the method accepts: "mm", "cm", "mm+cm"
    params_type: ClassVar[type | None] = None        # dataclass of the method's params.yaml block
    main_phase_name: ClassVar[str] = "main"           # metric prefix of the main phase
    # Runs on segmentation (dense logits, Table 2): the paper's Table 2 rows. MLLD, OFA, RKD and CRD have
    # none (the authors' code cannot apply them to dense outputs; baselines-spec.md Q7).
    segmentation: ClassVar[bool] = False

    def __init__(self, student: Network) -> None:
        super().__init__()
        self.student = student
        self._frozen: list[nn.Module] = []

    def freeze(self, module: nn.Module) -> nn.Module:
        """Mark `module` frozen: eval mode from now on, no gradients, never in the optimiser."""
        module.requires_grad_(False)
        module.eval()
        self._frozen.append(module)
        return module

    def train(self, mode: bool = True) -> "DistillationMethod":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    # ---- the main phase, from hooks ----

    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam with a constant learning rate over every trainable parameter (the authors' default).
        Fused: one kernel per step instead of a dozen per tensor (same update rule)."""
        return torch.optim.Adam(list(self.trainable_parameters()), lr=lr, fused=True)

    def prepare(self, context: RunContext) -> None:
        """Called once before the main phase, e.g. to cache the outputs of frozen networks."""

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        """Named, weighted loss terms of the main phase for one batch at 0-based `epoch`; summed."""
        raise NotImplementedError

    def validation_score(self, context: RunContext, epoch: int) -> float | None:
        """Model-selection score after `epoch` (lower is better), or None for the engine's rule."""
        return None

    def epoch_values(self, epoch: int) -> dict[str, float]:
        """Scalars worth logging for `epoch` (loss weights, schedules)."""
        return {}

    def main_phase(self, context: RunContext) -> Phase:
        """The phase that trains the student with `loss_terms`, selected on validation (`engine.selection`,
        or the method's `validation_score`)."""

        def validate(epoch: int) -> dict[str, float]:
            metrics = context.evaluate(self.student, "val").as_dict("val")
            score = self.validation_score(context, epoch)
            if score is not None:
                metrics["val_selection_score"] = score
            return metrics

        def score(metrics: dict[str, float], epoch: int) -> float:
            if "val_selection_score" in metrics:
                return metrics["val_selection_score"]
            return metrics["val_loss"] if context.selection == "val_loss" else -metrics["val_accuracy"]

        return Phase(self.main_phase_name, context.epochs, self.loss_terms,
                     lambda: self.configure_optimizer(context.lr), train_modules=[self], validate=validate,
                     score=score, selected=[self.student], before=lambda: self.prepare(context),
                     epoch_values=self.epoch_values, patience=context.patience, min_epochs=context.min_epochs)

    def phases(self, context: RunContext) -> list[Phase]:
        """The phases of one run, in order (default: the main phase alone)."""
        return [self.main_phase(context)]

    def evaluated_networks(self) -> dict[str, Network]:
        """Networks evaluated on the test split after training, by role ("student" = the target)."""
        return {"student": self.student}

    def checkpoints(self) -> dict[str, nn.Module]:
        """Modules a run saves for later DVC stages, by name (default: none)."""
        return {}

    def run_extras(self, result: Any) -> dict[str, Any]:
        """Method-specific fields of the run's result record (e.g. MST's routing), from the TrainResult."""
        return {}

    @classmethod
    def from_setup(cls, setup: MethodSetup) -> "DistillationMethod":
        """Build the method for one run."""
        raise NotImplementedError(f"method {cls.name!r} cannot be built by the pipeline")

    @classmethod
    def run_params(cls, method_params: Any) -> dict[str, Any]:
        """The method's own params, flattened for the experiment tracker."""
        if method_params is None:
            return {}
        return {f"{cls.name}.{k}": v for k, v in flatten(method_params).items()}
