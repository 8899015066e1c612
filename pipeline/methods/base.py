"""The contract every distillation method implements, and the method registry.

A method owns its math and its extra modules. The training engine asks it for a mapping of named
loss terms (weights already applied) and sums them; the method never logs, saves or prints.
Frozen teachers are registered with :meth:`DistillationMethod.freeze`, which keeps them in eval mode,
out of the optimiser and without gradients.

Hooks a method may override, all with working defaults:
- `prepare(context)`: once before the main training: cache frozen outputs, run a pre-stage (FitNets'
  hint training, MGDFR's co-training and salience), using `context` for data, split, epochs and logging;
- `configure_optimizer(lr)`: the optimiser (default: Adam over every trainable parameter);
- `validation_score(context, epoch)`: the model-selection score (default None: the engine's rule,
  validation cross-entropy of the student);
- `epoch_values(epoch)`: scalars to log per epoch (loss weights, schedules).

A method's own params are a frozen dataclass `params_type`, read from the top-level key of params.yaml
equal to its `name`; its `teachers` field lists the teacher configurations the pipeline runs it with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.data.tensors import Batch, DeviceDataset
from pipeline.models.registry import Network

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
    """Everything a method is built from for one run (see `DistillationMethod.from_setup`)."""

    student: Network                          # freshly initialised network of the target modality
    teacher: Network | None                   # teachers-stage checkpoint: MM or CM network; None for "mm+cm"
    teacher_config: str                       # "mm", "cm" or "mm+cm"
    target: str                               # "m1" or "m2"
    dataset: str                              # dataset key, e.g. "av_digits" (per-dataset taps live in params)
    num_classes: int
    sample: Batch                             # a few training samples, for sizing connectors by feature shape
    build_network: Callable[[str], Network]   # a fresh network for a role: "mm", "m1" or "m2"
    method_params: Any                        # the method's own params block (its `params_type`), or None
    cache_frozen_outputs: bool = True         # engine.cache_frozen_outputs


@dataclass
class TrainContext:
    """What `prepare` and `validation_score` may use: the data, the run's split and training settings."""

    data: DeviceDataset
    split: dict[str, torch.Tensor]            # "train", "val", "test" positions
    batch_size: int
    epochs: int                               # the dataset's training epochs
    lr: float
    num_classes: int
    generator: torch.Generator                # the run's shuffling generator (shared with the main training)
    log: Callable[[dict[str, float], int], None] = field(default=lambda metrics, step: None)


class DistillationMethod(nn.Module):
    """Base class: a student, optional teachers, and the loss the student is trained with."""

    name: ClassVar[str]
    teacher_configs: ClassVar[tuple[str, ...]] = ()  # which teachers the method accepts: "mm", "cm", "mm+cm"
    params_type: ClassVar[type | None] = None        # dataclass of the method's params.yaml block

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

    def configure_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Adam with a constant learning rate over every trainable parameter (the authors' default).
        Fused: one kernel per step instead of a dozen per tensor (same update rule)."""
        return torch.optim.Adam(list(self.trainable_parameters()), lr=lr, fused=True)

    def prepare(self, context: TrainContext) -> None:
        """Called once before training, e.g. to cache the outputs of frozen networks."""

    def loss_terms(self, batch: Batch, epoch: int) -> Mapping[str, torch.Tensor]:
        """Named, weighted loss terms for one training batch at 0-based `epoch`; the engine sums them."""
        raise NotImplementedError

    def validation_score(self, context: TrainContext, epoch: int) -> float | None:
        """Model-selection score after `epoch` (lower is better), or None for the engine's rule."""
        return None

    def epoch_values(self, epoch: int) -> dict[str, float]:
        """Scalars worth logging for `epoch` (loss weights, schedules)."""
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
        return {f"{cls.name}.{k}": v for k, v in flatten_params(method_params).items()}


def flatten_params(block: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) params dataclass or mapping as {"a.b": value}."""
    items = dataclasses.asdict(block).items() if dataclasses.is_dataclass(block) else dict(block).items()
    out: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = value
    return out
